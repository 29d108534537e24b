"""BEiT v2 VQ-KD tokenizer (mae_scale.tokenizers.vqkd): official encoder-side key layout, encode
against an independent plain-tensor reference, state-dict files ({"model": ...} .pth, safetensors),
refusals, and the BEiT objective taking its ids as targets."""

import argparse
import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from untrusted_files import WritesFileOnLoad, tokenizer_refusal
from mae_scale.tokenizers import load_tokenizer
from mae_scale.tokenizers.vqkd import VQKDEncoder, VQKDTokenizer


def _official_layout():
    """Encoder-side tensors of microsoft/unilm beit2 vqkd_encoder_base_decoder_3x768x12_clip, derived
    by hand from modeling_vqkd.py (encoder_config = get_model_default_params(), num_classes 0;
    quantize before encode_task_layer), modeling_finetune.py VisionTransformer (qkv weight without
    bias + q_bias / v_bias, init_values 0: no gamma_1/2, use_mean_pooling: fc_norm, no norm, no
    rel pos bias, head Identity) and norm_ema_quantizer.py (embedding.weight [8192, 32])."""
    d, hid = 768, 3072
    out = {
        "encoder.cls_token": (1, 1, d),
        "encoder.pos_embed": (1, 197, d),
        "encoder.patch_embed.proj.weight": (d, 3, 16, 16),
        "encoder.patch_embed.proj.bias": (d,),
    }
    for i in range(12):
        b = f"encoder.blocks.{i}."
        out.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.q_bias": (d,), b + "attn.v_bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hid, d), b + "mlp.fc1.bias": (hid,),
            b + "mlp.fc2.weight": (d, hid), b + "mlp.fc2.bias": (d,),
        })
    out.update({
        "encoder.fc_norm.weight": (d,), "encoder.fc_norm.bias": (d,),
        "quantize.embedding.weight": (8192, 32),
        "encode_task_layer.0.weight": (d, d), "encode_task_layer.0.bias": (d,),
        "encode_task_layer.2.weight": (32, d), "encode_task_layer.2.bias": (32,),
    })
    return out


OFFICIAL = _official_layout()
OFFICIAL_KEYS, OFFICIAL_VALUES = 167, 86_666_784  # 4 + 12 * 13 + 2 + 1 + 4 keys
# Same layout, small: width 128 (2 heads of 64), 2 blocks, 16-px patches on a 4 x 4 grid (64 px).
SMALL = dict(embed_dim=128, depth=2, num_heads=2, mlp_hidden=512, patch_size=16, in_chans=3, grid=4,
             n_code=64, code_dim=8)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _small_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in VQKDEncoder(**SMALL).state_dict().items():
        if k.endswith(("norm1.weight", "norm2.weight", "fc_norm.weight")):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k == "quantize.embedding.weight":
            # Rows of unequal norm: an implementation that re-normalized the codebook would differ.
            e = torch.randn(v.shape, generator=g)
            sd[k] = e / e.norm(dim=1, keepdim=True) * (0.5 + torch.rand(v.shape[0], 1, generator=g))
        else:
            fan_in = v[0].numel() if v.ndim > 1 else 16
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)  # biases non-zero too
    return sd


def _with_training_keys(sd):
    """What the official file holds besides the encoder side: EMA statistics, decoder, teacher, ..."""
    k, d = SMALL["n_code"], SMALL["code_dim"]
    extra = {
        "quantize.embedding.cluster_size": torch.rand(k), "quantize.embedding.embed_avg": torch.randn(k, d),
        "quantize.embedding.initted": torch.ones(1), "quantize.cluster_size": torch.rand(k),
        "decoder.pos_embed": torch.randn(1, 17, 128), "decoder.blocks.0.attn.qkv.weight": torch.randn(384, 128),
        "decoder.patch_embed.proj.weight": torch.randn(128, d, 1, 1),
        "decode_task_layer.2.weight": torch.randn(512, 128),
        "teacher_model.visual.proj": torch.randn(768, 512), "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
        "loss.weight": torch.zeros(1),
    }
    return {**sd, **extra}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    sd = _small_state_dict()
    d = tmp_path_factory.mktemp("vqkd")
    full = _with_training_keys(sd)
    files = {"pth": d / "vqkd.pth", "st": d / "vqkd.safetensors", "sd": d / "vqkd_state_dict.pth",
             "bare": d / "vqkd_bare.pth"}
    torch.save({"model": full, "epoch": 3}, files["pth"])  # official: torch.save({"model": ...})
    save_file(full, str(files["st"]))
    torch.save({"state_dict": full}, files["sd"])
    torch.save(sd, files["bare"])
    return sd, files


def _images(n=2, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, size, size, generator=g)
    return (pixels - MEAN) / STD, pixels


# ------------------------------------------------------------- independent reference
def _layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _reference(sd, pixels, heads, pos=None):
    """Plain-tensor VQ-KD get_tokens on pixels in [0, 1]: ids [B, h, w] and features [B, L, code_dim]."""
    x = pixels.double() * 255.0 / 127.5 - 1.0  # pre_process 'default'
    s = {k: v.double() for k, v in sd.items()}
    w = s["encoder.patch_embed.proj.weight"]
    dim, c, p, _ = w.shape
    b, _, hh, ww = x.shape
    gh, gw = hh // p, ww // p
    # patches in (c, i, j) order, row-major over the grid, as a stride-p conv sees them
    patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
    t = patches @ w.reshape(dim, -1).T + s["encoder.patch_embed.proj.bias"]
    t = torch.cat([s["encoder.cls_token"].expand(b, 1, dim), t], dim=1)
    t = t + (s["encoder.pos_embed"] if pos is None else pos.double())
    hd = dim // heads
    i = 0
    while f"encoder.blocks.{i}.norm1.weight" in s:
        k = f"encoder.blocks.{i}."
        h = _layer_norm(t, s[k + "norm1.weight"], s[k + "norm1.bias"])
        bias = torch.cat([s[k + "attn.q_bias"], torch.zeros(dim, dtype=torch.double), s[k + "attn.v_bias"]])
        qkv = h @ s[k + "attn.qkv.weight"].T + bias
        q, kk, v = (qkv[..., j * dim:(j + 1) * dim].reshape(b, -1, heads, hd) for j in range(3))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, kk) * hd ** -0.5
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        att = e / e.sum(dim=-1, keepdim=True)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, -1, dim)
        t = t + o @ s[k + "attn.proj.weight"].T + s[k + "attn.proj.bias"]
        h = _layer_norm(t, s[k + "norm2.weight"], s[k + "norm2.bias"])
        h = h @ s[k + "mlp.fc1.weight"].T + s[k + "mlp.fc1.bias"]
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
        t = t + h @ s[k + "mlp.fc2.weight"].T + s[k + "mlp.fc2.bias"]
        i += 1
    f = _layer_norm(t[:, 1:], s["encoder.fc_norm.weight"], s["encoder.fc_norm.bias"])  # patch tokens only
    f = torch.tanh(f @ s["encode_task_layer.0.weight"].T + s["encode_task_layer.0.bias"])
    z = f @ s["encode_task_layer.2.weight"].T + s["encode_task_layer.2.bias"]
    zn = z / z.norm(dim=-1, keepdim=True)
    cb = s["quantize.embedding.weight"]  # as stored, not re-normalized
    dist = (zn ** 2).sum(-1, keepdim=True) + (cb ** 2).sum(-1) - 2.0 * zn @ cb.T
    top2 = dist.topk(2, dim=-1, largest=False).values
    return dist.argmin(-1).reshape(b, gh, gw), z, (top2[..., 1] - top2[..., 0]).reshape(b, gh, gw)


def _assert_matches_reference(ids, ref, margin):
    """Equal wherever the reference's best codeword wins by more than float noise (and >= 99% overall)."""
    clear = margin > 1e-4
    assert torch.equal(ids[clear], ref[clear])
    assert clear.float().mean() > 0.9 and (ids == ref).float().mean() >= 0.99


# ----------------------------------------------------------------------------- tests
def test_default_config_matches_official_keys_and_shapes():
    assert len(OFFICIAL) == OFFICIAL_KEYS
    assert sum(torch.Size(s).numel() for s in OFFICIAL.values()) == OFFICIAL_VALUES
    sd = VQKDEncoder().state_dict()
    assert list(sd) == list(OFFICIAL)  # same keys, in the official module's order
    assert {k: tuple(v.shape) for k, v in sd.items()} == OFFICIAL
    assert all(v.dtype == torch.float32 for v in sd.values())
    # ... and the full-size hyper-parameters come back from the official shapes (12 heads = 768 / 64)
    shapes = {k: torch.empty(s) for k, s in OFFICIAL.items()}
    assert VQKDEncoder.config_from_state_dict(shapes) == dict(
        embed_dim=768, depth=12, num_heads=12, mlp_hidden=3072, patch_size=16, in_chans=3, grid=14,
        n_code=8192, code_dim=32)


def test_small_config_round_trip():
    sd = VQKDEncoder(**SMALL).state_dict()
    assert VQKDEncoder.config_from_state_dict(sd) == SMALL
    assert not any(k.endswith(("gamma_1", "relative_position_bias_table")) or k.startswith("encoder.norm.")
                   for k in sd)


def test_encode_matches_independent_reference(small):
    sd, files = small
    tok = load_tokenizer(files["pth"])
    assert isinstance(tok, VQKDTokenizer)
    assert tok.patch_size == 16 and tok.vocab_size == 64
    images, pixels = _images()
    ids = tok.encode(images)
    assert ids.shape == (2, 4, 4) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 64 and ids.unique().numel() > 4
    ref, z, margin = _reference(sd, pixels, heads=2)
    _assert_matches_reference(ids, ref, margin)
    with torch.no_grad():  # the features themselves, not only their argmin
        feats = tok.encoder.features(pixels * 255.0 / 127.5 - 1.0)
    torch.testing.assert_close(feats.double(), z, atol=1e-4, rtol=1e-4)
    assert torch.equal(ids, tok.encode(images))  # deterministic
    assert not tok.encoder.training and not any(p.requires_grad for p in tok.encoder.parameters())


def test_other_grid_gets_the_official_position_interpolation(small):
    sd, files = small
    tok = load_tokenizer(files["st"])
    images, pixels = _images(size=48, seed=2)  # 3 x 3 patches, the file holds a 4 x 4 grid
    ids = tok.encode(images)
    assert ids.shape == (2, 3, 3)
    # modeling_finetune.interpolate_pos_encoding: bicubic, scale factor (grid + 0.1) / sqrt(N)
    patch_pos = sd["encoder.pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(patch_pos, scale_factor=(3.1 / 4, 3.1 / 4), mode="bicubic")
    pos = torch.cat([sd["encoder.pos_embed"][:, :1], resized.permute(0, 2, 3, 1).reshape(1, 9, -1)], dim=1)
    ref, z, margin = _reference(sd, pixels, heads=2, pos=pos)
    _assert_matches_reference(ids, ref, margin)
    with torch.no_grad():
        feats = tok.encoder.features(pixels * 255.0 / 127.5 - 1.0)
    torch.testing.assert_close(feats.double(), z, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="multiples of 16"):
        tok.encode(images[:, :, :40])


def test_all_file_forms_give_the_same_tokens(small):
    _, files = small
    images, _ = _images(seed=3)
    tokens = {name: load_tokenizer(path).encode(images) for name, path in files.items()}
    assert all(torch.equal(t, tokens["pth"]) for t in tokens.values())


def _save(sd, path):
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd}, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_missing_misshaped_and_unexpected_keys_are_named(small, tmp_path, suffix):
    sd, _ = small
    full = _with_training_keys(sd)
    missing = {k: v for k, v in full.items() if k != "encoder.blocks.1.attn.v_bias"}
    _save(missing, tmp_path / f"missing{suffix}")
    message = tokenizer_refusal(tmp_path / f"missing{suffix}")
    assert "encoder.blocks.1.attn.v_bias" in message and "missing" in message
    bad = dict(full, **{"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    _save(bad, tmp_path / f"bad{suffix}")
    message = tokenizer_refusal(tmp_path / f"bad{suffix}")
    assert "encoder.blocks.0.attn.qkv.weight" in message and "(3, 3)" in message and "(384, 128)" in message
    scaled = dict(full, **{"encoder.blocks.0.gamma_1": torch.ones(128)})  # layer-scale: not this architecture
    _save(scaled, tmp_path / f"scaled{suffix}")
    assert "encoder.blocks.0.gamma_1" in tokenizer_refusal(tmp_path / f"scaled{suffix}")
    stats = dict(full, **{"quantize.embedding.embed_avg": torch.zeros(64, 9)})
    _save(stats, tmp_path / f"stats{suffix}")
    assert "quantize.embedding.embed_avg" in tokenizer_refusal(tmp_path / f"stats{suffix}")
    untrained = dict(full, **{"quantize.embedding.initted": torch.zeros(1)})
    _save(untrained, tmp_path / f"untrained{suffix}")
    assert "never initialized" in tokenizer_refusal(tmp_path / f"untrained{suffix}")
    odd = dict(full, **{"encoder.pos_embed": torch.zeros(1, 13, 128)})
    _save(odd, tmp_path / f"odd{suffix}")
    assert "square" in tokenizer_refusal(tmp_path / f"odd{suffix}")


def test_refuses_pickled_module_code_and_objects_without_running_them(small, tmp_path):
    sd, _ = small
    enc = VQKDEncoder(**SMALL)
    module = tmp_path / "vqkd_module.pth"
    torch.save(enc, module)  # an nn.Module, not a state dict
    assert "state dict" in tokenizer_refusal(module)
    marker = tmp_path / "marker"
    zipped = tmp_path / "evil.pth"
    torch.save({"model": dict(sd, **{"quantize.embedding.weight": WritesFileOnLoad(marker)})}, zipped)
    assert "state dict" in tokenizer_refusal(zipped)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"model": WritesFileOnLoad(marker)}))
    assert "state dict" in tokenizer_refusal(raw)
    assert not marker.exists()
    # a training checkpoint that also pickles Python objects (an argparse namespace) is refused too
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3)}, ckpt)
    assert "state dict" in tokenizer_refusal(ckpt)
    assert "URL" in tokenizer_refusal("https://conversationhub.blob.core.windows.net/beit-share-public/beitv2/"
                                      "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth")


def test_other_state_dicts_still_say_what_is_supported(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"model": {"encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}}, other)
    message = tokenizer_refusal(other)
    assert "VQ-KD" in message and "DALL-E" in message and "quantize.embedding.weight" in message


def test_beit_objective_takes_vqkd_ids_as_targets(small):
    """What the trainer does for objective beit (load_tokenizer, patch-size check, encode, loss), on CPU."""
    from mae_scale.models.mim import build_mim
    from mae_scale.visualize import beit_grid

    _, files = small
    tok = load_tokenizer(files["pth"])
    model = build_mim("vit_tiny_patch16", "beit", img_size=64, vocab_size=tok.vocab_size)
    assert tok.patch_size == model.patch_size
    images, _ = _images()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 3:9] = True
    ids = tok.encode(images)
    loss, logits, extras = model(images, mask, ids)
    assert torch.isfinite(loss) and logits.shape == (12, 64) and 0 <= float(extras["masked_acc"]) <= 1
    # the loss is the cross entropy against exactly these ids
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, ids.reshape(2, -1)[mask]))
    loss.backward()
    assert model.beit_head.weight.grad is not None and model.beit_head.weight.grad.abs().sum() > 0
    grid = beit_grid(model, images, mask, tok)  # no decode_patches: the picture falls back to the image
    assert grid.size == (4 * 64, 2 * 64)
