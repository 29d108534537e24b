"""DALL-E dVAE encoder tokenizer (mae_scale.tokenizers.dalle): official key layout, state-dict
files (safetensors and weights-only .pth), encode shape / range / determinism, refusals."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from untrusted_files import WritesFileOnLoad, tokenizer_refusal
from mae_scale.tokenizers import load_tokenizer
from mae_scale.tokenizers.dalle import DallEEncoder, DallETokenizer, map_pixels

# Every tensor of openai/DALL-E dall_e/encoder.py Encoder() (group_count 4, n_hid 256, n_blk_per_group
# 2, input_channels 3, vocab_size 8192), derived by hand from that file and dall_e/utils.py Conv2d
# (w [out, in, kw, kw], b [out]); id_path convs only where a block changes width.
OFFICIAL = {
    'blocks.input.w': (256, 3, 7, 7),
    'blocks.input.b': (256,),
    'blocks.group_1.block_1.res_path.conv_1.w': (64, 256, 3, 3),
    'blocks.group_1.block_1.res_path.conv_1.b': (64,),
    'blocks.group_1.block_1.res_path.conv_2.w': (64, 64, 3, 3),
    'blocks.group_1.block_1.res_path.conv_2.b': (64,),
    'blocks.group_1.block_1.res_path.conv_3.w': (64, 64, 3, 3),
    'blocks.group_1.block_1.res_path.conv_3.b': (64,),
    'blocks.group_1.block_1.res_path.conv_4.w': (256, 64, 1, 1),
    'blocks.group_1.block_1.res_path.conv_4.b': (256,),
    'blocks.group_1.block_2.res_path.conv_1.w': (64, 256, 3, 3),
    'blocks.group_1.block_2.res_path.conv_1.b': (64,),
    'blocks.group_1.block_2.res_path.conv_2.w': (64, 64, 3, 3),
    'blocks.group_1.block_2.res_path.conv_2.b': (64,),
    'blocks.group_1.block_2.res_path.conv_3.w': (64, 64, 3, 3),
    'blocks.group_1.block_2.res_path.conv_3.b': (64,),
    'blocks.group_1.block_2.res_path.conv_4.w': (256, 64, 1, 1),
    'blocks.group_1.block_2.res_path.conv_4.b': (256,),
    'blocks.group_2.block_1.id_path.w': (512, 256, 1, 1),
    'blocks.group_2.block_1.id_path.b': (512,),
    'blocks.group_2.block_1.res_path.conv_1.w': (128, 256, 3, 3),
    'blocks.group_2.block_1.res_path.conv_1.b': (128,),
    'blocks.group_2.block_1.res_path.conv_2.w': (128, 128, 3, 3),
    'blocks.group_2.block_1.res_path.conv_2.b': (128,),
    'blocks.group_2.block_1.res_path.conv_3.w': (128, 128, 3, 3),
    'blocks.group_2.block_1.res_path.conv_3.b': (128,),
    'blocks.group_2.block_1.res_path.conv_4.w': (512, 128, 1, 1),
    'blocks.group_2.block_1.res_path.conv_4.b': (512,),
    'blocks.group_2.block_2.res_path.conv_1.w': (128, 512, 3, 3),
    'blocks.group_2.block_2.res_path.conv_1.b': (128,),
    'blocks.group_2.block_2.res_path.conv_2.w': (128, 128, 3, 3),
    'blocks.group_2.block_2.res_path.conv_2.b': (128,),
    'blocks.group_2.block_2.res_path.conv_3.w': (128, 128, 3, 3),
    'blocks.group_2.block_2.res_path.conv_3.b': (128,),
    'blocks.group_2.block_2.res_path.conv_4.w': (512, 128, 1, 1),
    'blocks.group_2.block_2.res_path.conv_4.b': (512,),
    'blocks.group_3.block_1.id_path.w': (1024, 512, 1, 1),
    'blocks.group_3.block_1.id_path.b': (1024,),
    'blocks.group_3.block_1.res_path.conv_1.w': (256, 512, 3, 3),
    'blocks.group_3.block_1.res_path.conv_1.b': (256,),
    'blocks.group_3.block_1.res_path.conv_2.w': (256, 256, 3, 3),
    'blocks.group_3.block_1.res_path.conv_2.b': (256,),
    'blocks.group_3.block_1.res_path.conv_3.w': (256, 256, 3, 3),
    'blocks.group_3.block_1.res_path.conv_3.b': (256,),
    'blocks.group_3.block_1.res_path.conv_4.w': (1024, 256, 1, 1),
    'blocks.group_3.block_1.res_path.conv_4.b': (1024,),
    'blocks.group_3.block_2.res_path.conv_1.w': (256, 1024, 3, 3),
    'blocks.group_3.block_2.res_path.conv_1.b': (256,),
    'blocks.group_3.block_2.res_path.conv_2.w': (256, 256, 3, 3),
    'blocks.group_3.block_2.res_path.conv_2.b': (256,),
    'blocks.group_3.block_2.res_path.conv_3.w': (256, 256, 3, 3),
    'blocks.group_3.block_2.res_path.conv_3.b': (256,),
    'blocks.group_3.block_2.res_path.conv_4.w': (1024, 256, 1, 1),
    'blocks.group_3.block_2.res_path.conv_4.b': (1024,),
    'blocks.group_4.block_1.id_path.w': (2048, 1024, 1, 1),
    'blocks.group_4.block_1.id_path.b': (2048,),
    'blocks.group_4.block_1.res_path.conv_1.w': (512, 1024, 3, 3),
    'blocks.group_4.block_1.res_path.conv_1.b': (512,),
    'blocks.group_4.block_1.res_path.conv_2.w': (512, 512, 3, 3),
    'blocks.group_4.block_1.res_path.conv_2.b': (512,),
    'blocks.group_4.block_1.res_path.conv_3.w': (512, 512, 3, 3),
    'blocks.group_4.block_1.res_path.conv_3.b': (512,),
    'blocks.group_4.block_1.res_path.conv_4.w': (2048, 512, 1, 1),
    'blocks.group_4.block_1.res_path.conv_4.b': (2048,),
    'blocks.group_4.block_2.res_path.conv_1.w': (512, 2048, 3, 3),
    'blocks.group_4.block_2.res_path.conv_1.b': (512,),
    'blocks.group_4.block_2.res_path.conv_2.w': (512, 512, 3, 3),
    'blocks.group_4.block_2.res_path.conv_2.b': (512,),
    'blocks.group_4.block_2.res_path.conv_3.w': (512, 512, 3, 3),
    'blocks.group_4.block_2.res_path.conv_3.b': (512,),
    'blocks.group_4.block_2.res_path.conv_4.w': (2048, 512, 1, 1),
    'blocks.group_4.block_2.res_path.conv_4.b': (2048,),
    'blocks.output.conv.w': (8192, 2048, 1, 1),
    'blocks.output.conv.b': (8192,),
}
OFFICIAL_KEYS, OFFICIAL_VALUES = 74, 53_786_240
SMALL = dict(n_hid=16, n_blk_per_group=1, vocab_size=64)  # same layout, fast on CPU


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    torch.manual_seed(0)
    enc = DallEEncoder(**SMALL)
    for p in enc.parameters():  # non-zero biases too, so a loading slip would show
        p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("dalle")
    st, pth = d / "dalle_encoder.safetensors", d / "dalle_encoder.pth"
    save_file(enc.state_dict(), str(st))
    torch.save(enc.state_dict(), pth)
    return enc, st, pth


def _images(n=2, size=224, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, size, size, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels - mean) / std, pixels


def test_default_config_matches_official_keys_and_shapes():
    assert len(OFFICIAL) == OFFICIAL_KEYS
    assert sum(torch.Size(s).numel() for s in OFFICIAL.values()) == OFFICIAL_VALUES
    sd = DallEEncoder().state_dict()
    assert list(sd) == list(OFFICIAL)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == OFFICIAL
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_small_config_forward_shape():
    enc = DallEEncoder(**SMALL)
    out = enc(map_pixels(torch.rand(1, 3, 32, 48)))
    assert out.shape == (1, 64, 4, 6)
    assert DallEEncoder.config_from_state_dict(enc.state_dict()) == dict(SMALL, input_channels=3)


def test_load_both_files_encode_same_deterministic(small_files):
    enc, st, pth = small_files
    images, pixels = _images()
    a, b = load_tokenizer(st), load_tokenizer(pth)
    assert isinstance(a, DallETokenizer) and isinstance(b, DallETokenizer)
    assert a.patch_size == 16 and a.vocab_size == 64 and b.vocab_size == 64
    ids = a.encode(images)
    assert ids.shape == (2, 14, 14) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 64 and ids.unique().numel() > 1
    assert torch.equal(ids, a.encode(images)) and torch.equal(ids, b.encode(images))
    # What encode does, spelled out: back to [0, 1], half size (bilinear, antialias), map_pixels, argmax.
    half = torch.nn.functional.interpolate(pixels, size=(112, 112), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = enc(map_pixels(half)).argmax(1)
    assert (ids == expected).float().mean() > 0.99  # float rounding of the un-normalization aside
    assert not a.encoder.training and not any(p.requires_grad for p in a.encoder.parameters())


def test_refuses_pickled_module_and_code_pickles(small_files, tmp_path):
    enc, _, _ = small_files
    module = tmp_path / "encoder.pkl"
    torch.save(enc, module)  # the nn.Module itself, as the official encoder.pkl is
    message = tokenizer_refusal(module)
    assert "encoder.pkl" in message and "state dict" in message and "save_file(enc.state_dict()" in message
    marker = tmp_path / "marker"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(WritesFileOnLoad(marker)))
    assert "state dict" in tokenizer_refusal(raw)
    zipped = tmp_path / "evil.pth"
    torch.save({"blocks.input.w": WritesFileOnLoad(marker)}, zipped)
    assert "state dict" in tokenizer_refusal(zipped)
    assert not marker.exists()


def test_wrong_shape_missing_and_extra_keys_are_named(small_files, tmp_path):
    enc, _, _ = small_files
    key = "blocks.group_2.block_1.res_path.conv_2.w"
    for fmt in ("safetensors", "pth"):
        sd = {k: v.clone() for k, v in enc.state_dict().items()}
        sd[key] = torch.zeros(3, 3, 3, 3)
        path = tmp_path / f"bad.{fmt}"
        save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
        message = tokenizer_refusal(path)
        assert key in message and "(3, 3, 3, 3)" in message
    sd = {k: v for k, v in enc.state_dict().items() if k != "blocks.output.conv.b"}
    save_file(sd, str(tmp_path / "missing.safetensors"))
    assert "blocks.output.conv.b" in tokenizer_refusal(tmp_path / "missing.safetensors")
    sd = dict(enc.state_dict(), **{"blocks.extra.w": torch.zeros(1)})
    save_file(sd, str(tmp_path / "extra.safetensors"))
    assert "blocks.extra.w" in tokenizer_refusal(tmp_path / "extra.safetensors")


def test_mim_picture_without_decoder(small_files):
    """The trainer's BEiT picture works with a tokenizer that cannot decode (no dVAE decoder here)."""
    from mae_scale.models.mim import build_mim
    from mae_scale.visualize import beit_grid

    enc, _, _ = small_files
    model = build_mim("vit_tiny_patch16", "beit", img_size=64, vocab_size=enc.vocab_size)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    grid = beit_grid(model, _images(size=64)[0], mask, DallETokenizer(enc))
    assert grid.size == (4 * 64, 2 * 64)
