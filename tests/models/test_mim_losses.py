"""SimMIM / BEiT model (mae_scale.models.mim): timm parity, mask-token order, losses by hand, grads."""

from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.testing import assert_close

from mae_scale.models.mim import MIM_OBJECTIVES, MaskedImageViT, build_mim
from mae_scale.models.vit import VIT_ARCHS

ARCH = "vit_tiny_patch16"
IMG = 32  # 2x2 token grid: explicit per-pixel loops stay cheap
GRID = IMG // 16
L = GRID * GRID
VOCAB = 11


def _model(objective: str = "simmim", **kw) -> MaskedImageViT:
    torch.manual_seed(0)
    return build_mim(ARCH, objective, img_size=IMG, vocab_size=VOCAB if objective == "beit" else None, **kw)


def _imgs(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


MASK = torch.tensor([[True, False, False, True], [False, True, True, True]])


# ---------------------------------------------------------------- layout and timm parity
def test_encoder_loads_strictly_into_timm_vit_and_gives_the_same_features():
    model = _model(drop_path=0.0).eval()
    a = VIT_ARCHS[ARCH]
    vit = VisionTransformer(img_size=IMG, patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth,
                            num_heads=a.num_heads, qkv_bias=True, init_values=0.1,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0).eval()
    encoder = {k: v for k, v in model.state_dict().items()
               if k != "mask_token" and not k.startswith("simmim_head.")}
    assert set(model.state_dict()) - set(encoder) == {"mask_token", "simmim_head.weight", "simmim_head.bias"}
    vit.load_state_dict(encoder, strict=True)
    assert "blocks.3.ls2.gamma" in encoder
    assert_close(encoder["blocks.0.ls1.gamma"], torch.full((a.embed_dim,), 0.1))
    x = _imgs(1)
    with torch.no_grad():
        assert_close(model.forward_encoder(x), vit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_init_and_options():
    model = _model("beit", drop_path=0.2)
    assert model.pos_embed.requires_grad  # learned, only initialised with sin-cos
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert 0.01 < model.mask_token.std().item() < 0.03
    assert set(k for k in model.state_dict() if k.startswith("beit_head")) == {"beit_head.weight", "beit_head.bias"}
    no_ls = _model(layer_scale=0)
    assert not any("ls1.gamma" in k for k in no_ls.state_dict())
    assert MIM_OBJECTIVES == ("simmim", "beit")
    with pytest.raises(ValueError):
        build_mim(ARCH, "mae")
    with pytest.raises(ValueError):
        build_mim(ARCH, "beit", img_size=IMG)  # no vocab_size
    with pytest.raises(ValueError):
        build_mim("vit_nope", "simmim")


# ---------------------------------------------------------------- mask token order
def test_all_masked_encoder_ignores_image_content_but_not_position():
    model = _model(drop_path=0.0).eval()
    mask = torch.ones(2, L, dtype=torch.bool)
    with torch.no_grad():
        a = model.forward_encoder(_imgs(1), mask)
        b = model.forward_encoder(_imgs(2) * 5, mask)
        c = model.forward_encoder(_imgs(2) * 5)  # unmasked: content matters
    assert_close(a, b)
    assert (a - c).abs().max() > 1e-2
    # Position is added after the replacement, so the masked tokens still differ by place.
    assert (a[0, 1] - a[0, 2]).abs().max() > 1e-3


def test_mask_replaces_tokens_before_cls_and_position():
    model = _model(drop_path=0.0).eval()
    x = _imgs(3)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens[MASK] = model.mask_token[0, 0]
        seq = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1) + model.pos_embed
        for blk in model.blocks:
            seq = blk(seq)
        expected = model.norm(seq)
        assert_close(model.forward_encoder(x, MASK), expected)


# ---------------------------------------------------------------- SimMIM loss by hand
def test_simmim_reconstruction_and_loss_match_explicit_loops():
    model = _model(drop_path=0.0).eval()
    x = _imgs(4)
    with torch.no_grad():
        loss, rec, extras = model(x, MASK)
        latent = model.forward_encoder(x, MASK)
    p = 16
    weight = model.simmim_head.weight[:, :, 0, 0]  # [p*p*3, D]
    bias = model.simmim_head.bias
    total, n_pix = 0.0, 0
    for b in range(2):
        for i in range(GRID):
            for j in range(GRID):
                out = weight @ latent[b, 1 + i * GRID + j] + bias  # this token's p*p*3 values
                # PixelShuffle layout: channel c * p * p + dy * p + dx -> pixel (c, i*p + dy, j*p + dx)
                assert_close(rec[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p], out.reshape(3, p, p),
                             rtol=1e-4, atol=1e-4)
                if MASK[b, i * GRID + j]:
                    for c in range(3):
                        for dy in range(p):
                            for dx in range(p):
                                total += abs(rec[b, c, i * p + dy, j * p + dx].item()
                                             - x[b, c, i * p + dy, j * p + dx].item())
                    n_pix += p * p
    assert n_pix == int(MASK.sum()) * p * p
    assert loss.dtype == torch.float32 and extras == {}
    assert loss.item() == pytest.approx(total / (n_pix + 1e-5) / 3, rel=1e-5)


def test_simmim_loss_ignores_unmasked_target_pixels():
    model = _model(drop_path=0.0).eval()
    x = _imgs(5)
    with torch.no_grad():
        latent = model.forward_encoder(x, MASK)
        loss, _ = model.forward_loss(x, latent, MASK)
        pix = MASK.reshape(2, 1, GRID, GRID).repeat_interleave(16, 2).repeat_interleave(16, 3)
        visible_changed = torch.where(pix, x, x + 7.0)  # only the visible pixels of the target move
        masked_changed = torch.where(pix, x + 7.0, x)
        assert_close(model.forward_loss(visible_changed, latent, MASK)[0], loss)
        assert model.forward_loss(masked_changed, latent, MASK)[0] > loss + 1.0


# ---------------------------------------------------------------- BEiT loss by hand
def test_beit_loss_and_accuracy_from_full_logits():
    model = _model("beit", drop_path=0.0).eval()
    x = _imgs(6)
    targets = torch.randint(VOCAB, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, logits, extras = model(x, MASK, targets)
        full = model.beit_head(model.forward_encoder(x, MASK)[:, 1:])  # [B, L, V]
    flat_t = targets.reshape(2, L)
    nll, hits, rows = [], 0, []
    for b in range(2):
        for t in range(L):
            if MASK[b, t]:
                row = full[b, t]
                rows.append(row)
                nll.append(-(row[flat_t[b, t]] - torch.logsumexp(row, 0)).item())
                hits += int(row.argmax().item() == flat_t[b, t].item())
    assert_close(logits, torch.stack(rows))  # masked positions only, row-major over the batch
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert extras["masked_acc"].item() == pytest.approx(hits / len(nll))
    # Unmasked targets are ignored.
    other = targets.clone().reshape(2, L)
    other[~MASK] = (other[~MASK] + 1) % VOCAB
    with torch.no_grad():
        assert_close(model(x, MASK, other.reshape(2, GRID, GRID))[0], loss)
    with pytest.raises(ValueError):
        model(x, MASK)  # beit needs target ids


# ---------------------------------------------------------------- training behaviour
@pytest.mark.parametrize("objective", MIM_OBJECTIVES)
def test_every_parameter_gets_a_finite_gradient(objective):
    model = _model(objective).train()
    targets = torch.randint(VOCAB, (2, GRID, GRID))
    loss, _, _ = model(_imgs(7), MASK, targets)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.mask_token.grad.abs().sum() > 0


def test_grad_checkpointing_and_bf16():
    x, targets = _imgs(8), torch.randint(VOCAB, (2, GRID, GRID))
    plain = _model("beit", drop_path=0.0).train()
    ckpt = _model("beit", drop_path=0.0, grad_checkpointing=True).train()
    lp, lc = plain(x, MASK, targets)[0], ckpt(x, MASK, targets)[0]
    lp.backward()
    lc.backward()
    assert_close(lp, lc)
    assert_close(plain.blocks[0].attn.qkv.weight.grad, ckpt.blocks[0].attn.qkv.weight.grad)
    half = _model("simmim").to(torch.bfloat16)
    loss, rec, _ = half(x, MASK)
    assert loss.dtype == torch.float32 and rec.dtype == torch.float32 and torch.isfinite(loss)
