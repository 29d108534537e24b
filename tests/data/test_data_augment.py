"""MAEAugment / decode_rgb: parity with torchvision's official transform, formats, bad inputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from data_pipeline import BadImage, MAEAugment, crop_params, decode_rgb

SIZE = 64


def _jpegs(sample_dir: Path, n: int = 6) -> list[bytes]:
    return [f.read_bytes() for f in sorted((sample_dir / "train").glob("*/*.JPEG"))[:n]]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_crop_params_match_torchvision_draws():
    rrc = transforms.RandomResizedCrop(SIZE, scale=(0.2, 1.0))
    img = torch.zeros(3, 375, 500)
    for seed in range(50):
        torch.manual_seed(seed)
        ref = rrc.get_params(img, rrc.scale, rrc.ratio)
        ours = crop_params(375, 500, rrc.scale, rrc.ratio, torch.Generator().manual_seed(seed))
        assert ours == tuple(ref)
    # a very wide image exhausts the 10 tries and takes the centre-crop fallback
    torch.manual_seed(0)
    wide = rrc.get_params(torch.zeros(3, 10, 1000), (0.9, 1.0), rrc.ratio)
    ours = crop_params(10, 1000, (0.9, 1.0), rrc.ratio, torch.Generator().manual_seed(0))
    assert ours == tuple(wide)


def test_matches_official_transform(sample_dir: Path):
    """Same seed => same crop and flip as Compose([RandomResizedCrop, RandomHorizontalFlip]) on
    PIL (the official MAE pipeline); pixels differ only by resize rounding."""
    official = transforms.Compose([
        transforms.RandomResizedCrop(
            SIZE, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])
    aug = MAEAugment(SIZE)
    diffs = []
    for k, data in enumerate(_jpegs(sample_dir)):
        for seed in range(4):
            torch.manual_seed(seed * 100 + k)
            ref = official(Image.open(io.BytesIO(data)).convert("RGB"))
            ours = aug(data, torch.Generator().manual_seed(seed * 100 + k))
            assert ours.dtype == torch.uint8 and ours.shape == (3, SIZE, SIZE)
            assert ours.is_contiguous()
            diffs.append((ours.float() - ref.float()).abs().mean().item())
    assert max(diffs) < 1.0, diffs


def test_pure_function_of_bytes_and_generator(sample_dir: Path):
    data = _jpegs(sample_dir, 1)[0]
    aug = MAEAugment(SIZE)
    a = aug(data, torch.Generator().manual_seed(7))
    b = aug(data, 7)
    c = aug(data, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_formats_become_rgb(sample_dir: Path):
    rgb = Image.open(io.BytesIO(_jpegs(sample_dir, 1)[0])).convert("RGB")
    gray = decode_rgb(_encode(rgb.convert("L"), "JPEG"))
    assert gray.shape[-1] == 3 and torch.equal(gray[..., 0], gray[..., 2])
    cmyk = decode_rgb(_encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert (cmyk.float() - torch.from_numpy(np.array(rgb)).float()).abs().mean() < 6
    rgba = rgb.convert("RGBA")
    png = decode_rgb(_encode(rgba, "PNG"))
    assert torch.equal(png, torch.from_numpy(np.array(rgb)))
    pal = decode_rgb(_encode(rgb.convert("P"), "PNG"))
    assert pal.shape == png.shape
    assert MAEAugment(SIZE)(_encode(rgb.convert("L"), "PNG"), 0).shape == (3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty"),
        (b"this is not an image", "undecodable"),
        (b"\xff\xd8\xff\xe0 truncated", "undecodable"),
    ],
)
def test_bad_bytes(data: bytes, kind: str):
    with pytest.raises(BadImage) as e:
        MAEAugment(SIZE)(data, 0)
    assert e.value.kind == kind


def test_decompression_bomb_guard(sample_dir: Path):
    jpg = _jpegs(sample_dir, 1)[0]
    png = _encode(Image.new("RGB", (100, 100)), "PNG")
    for data in (jpg, png):  # the JPEG header path and the PIL path
        with pytest.raises(BadImage, match="decompression-bomb") as e:
            decode_rgb(data, max_pixels=5000)
        assert e.value.kind == "too_large"
