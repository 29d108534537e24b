"""Behaviour of MaskedAutoencoderViT: key layout, gradients, masking, checkpointing, bf16, sizes."""

import math

import pytest
import torch
from torch.testing import assert_close

from mae_scale.models import (
    MODEL_NAMES,
    MaskedAutoencoderViT,
    build_mae,
    get_2d_sincos_pos_embed,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch16,
)

IMG = 64  # 4x4 patch grid keeps the tiny model fast
L = (IMG // 16) ** 2


def _tiny(**kw) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return mae_vit_tiny_patch16(img_size=IMG, **kw)


# ---------------------------------------------------------------- key layout and init
def _expected_keys(depth: int, decoder_depth: int) -> set:
    layers = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    block = [f"{m}.{t}" for m in layers for t in ("weight", "bias")]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "mask_token", "decoder_embed.weight", "decoder_embed.bias",
            "decoder_pos_embed", "decoder_norm.weight", "decoder_norm.bias",
            "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


def test_state_dict_has_exactly_the_published_keys():
    model = _tiny()
    assert set(model.state_dict()) == _expected_keys(depth=4, decoder_depth=2)
    assert list(model.buffers()) == []


def test_pos_embeds_are_fixed_sincos_and_frozen():
    model = _tiny()
    for param, dim in ((model.pos_embed, 192), (model.decoder_pos_embed, 128)):
        assert not param.requires_grad
        assert param.shape == (1, 1 + L, dim)
        assert_close(param[0], get_2d_sincos_pos_embed(dim, 4, cls_token=True).float())
        assert torch.count_nonzero(param[0, 0]) == 0  # cls position
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable


def test_init_follows_mae():
    model = _tiny()
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.count_nonzero(model.norm.bias) == 0
    fan_out, fan_in = model.blocks[0].attn.qkv.weight.shape  # xavier over the fused [3D, D] matrix
    assert model.blocks[0].attn.qkv.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
    w = model.patch_embed.proj.weight.view(192, -1)
    assert w.abs().max() <= math.sqrt(6 / sum(w.shape))
    assert 0.01 < model.cls_token.std() < 0.03 and 0.01 < model.mask_token.std() < 0.03


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_every_trainable_parameter_gets_a_finite_nonzero_grad(norm_pix_loss):
    model = _tiny(norm_pix_loss=norm_pix_loss).train()
    loss, pred, mask = model(torch.randn(2, 3, IMG, IMG))
    assert pred.shape == (2, L, 16 * 16 * 3) and mask.shape == (2, L)
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.75, 0.9])
def test_random_masking_keeps_lowest_noise_patches(ratio):
    n, length, dim = 3, 196, 8
    x = torch.randn(n, length, dim)
    noise = torch.rand(n, length)
    visible, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, ratio, noise)
    keep = int(length * (1 - ratio))
    assert visible.shape == (n, keep, dim)
    assert torch.all(mask.sum(dim=1) == length - keep)
    assert mask.dtype == torch.float32
    order = torch.argsort(noise, dim=1)
    for b in range(n):
        assert_close(visible[b], x[b, order[b, :keep]], rtol=0, atol=0)  # ascending noise order
        expected = torch.ones(length)
        expected[order[b, :keep]] = 0
        assert_close(mask[b], expected, rtol=0, atol=0)
        assert torch.equal(order[b][ids_restore[b]], torch.arange(length))  # inverse permutation


def test_forward_masks_the_right_count_and_differs_per_sample():
    model = _tiny().eval()
    with torch.no_grad():
        _, _, mask = model(torch.randn(4, 3, IMG, IMG), mask_ratio=0.75)
    assert torch.all(mask.sum(dim=1) == L - int(L * 0.25))
    assert len({tuple(m.tolist()) for m in mask}) > 1


def test_fixed_noise_makes_forward_deterministic():
    model = _tiny().eval()
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, L)
    with torch.no_grad():
        a, b = model(imgs, noise=noise), model(imgs, noise=noise)
    for x, y in zip(a, b):
        assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------- activation checkpointing
def test_grad_checkpointing_gives_identical_loss_and_grads():
    plain = _tiny().train()
    ckpt = _tiny(grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    # A pre-hook: non-reentrant recomputation stops early, before forward hooks would fire.
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, L)
    loss_a, _, _ = plain(imgs, noise=noise)
    loss_b, _, _ = ckpt(imgs, noise=noise)
    loss_a.backward()
    loss_b.backward()
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran
    assert_close(loss_a, loss_b, rtol=0, atol=0)
    grads_b = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads_b[name].grad, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------- mixed precision
def test_bf16_params_take_fp32_images_and_return_fp32_loss():
    model = _tiny()
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, L)
    with torch.no_grad():
        ref_loss, _, _ = model(imgs, noise=noise)
    model = model.to(torch.bfloat16).train()
    loss, pred, mask = model(imgs, noise=noise)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pred.dtype == torch.bfloat16 and mask.dtype == torch.float32
    assert_close(loss, ref_loss, rtol=5e-2, atol=0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- presets and sizes
def _block_params(d: int, mlp_ratio: float = 4.0) -> int:
    h = int(d * mlp_ratio)
    # norm1 + qkv + proj + norm2 + fc1 + fc2
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)


def _expected_counts(p: int, d: int, depth: int, dd: int, ddepth: int, c: int = 3) -> tuple:
    """(trainable encoder, trainable total) from the architecture; pos embeds are frozen."""
    encoder = (c * p * p * d + d) + d + depth * _block_params(d) + 2 * d  # patch_embed, cls, blocks, norm
    decoder = (d * dd + dd) + dd + ddepth * _block_params(dd) + 2 * dd + (dd * p * p * c + p * p * c)
    return encoder, encoder + decoder


def _counts(model: torch.nn.Module) -> tuple:
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    encoder = sum(v for n, v in trainable.items() if not (n.startswith("decoder_") or n == "mask_token"))
    return encoder, sum(trainable.values())


def test_vit_huge_parameter_count_matches_paper_release():
    with torch.device("meta"):  # no memory, no real init
        model = mae_vit_huge_patch14()
    assert _expected_counts(14, 1280, 32, 512, 8) == (630_435_840, 656_613_964)
    assert _counts(model) == (630_435_840, 656_613_964)


@pytest.mark.parametrize(
    "factory,arch",
    [(mae_vit_base_patch16, (16, 768, 12, 512, 8)), (mae_vit_large_patch16, (16, 1024, 24, 512, 8))],
    ids=["base", "large"],
)
def test_base_and_large_parameter_counts(factory, arch):
    with torch.device("meta"):
        model = factory()
    assert _counts(model) == _expected_counts(*arch)
    p, d, _, dd, _ = arch
    frozen = sum(t.numel() for t in model.parameters() if not t.requires_grad)
    assert frozen == (1 + (224 // p) ** 2) * (d + dd)


def test_build_mae_by_name_and_overrides():
    with torch.device("meta"):
        models = {name: build_mae(name) for name in MODEL_NAMES}
    assert models["mae_vit_huge_patch14"].patch_size == 14
    assert models["mae_vit_large_patch16"].blocks[0].attn.num_heads == 16
    model = build_mae("mae_vit_tiny_patch16", img_size=32, norm_pix_loss=True, grad_checkpointing=True)
    assert model.norm_pix_loss and model.grad_checkpointing
    assert model.pos_embed.shape == (1, 1 + 4, 192)
    assert len(model.blocks) == 4 and len(model.decoder_blocks) == 2


def test_build_mae_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="mae_vit_huge_patch14"):
        build_mae("mae_vit_gigantic_patch14")


def test_meta_built_model_can_be_materialised_and_initialised():
    with torch.device("meta"):
        model = mae_vit_tiny_patch16(img_size=IMG)
    model = model.to_empty(device="cpu")
    model.initialize_weights()
    loss, _, _ = model(torch.randn(1, 3, IMG, IMG))
    assert torch.isfinite(loss)
    assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(192, 4, cls_token=True).float())
