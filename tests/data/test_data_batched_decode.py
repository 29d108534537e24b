"""make_loader(decode_device=...): the batched decode path (nvJPEG on CUDA), checked on the CPU
with decode_device="cpu-batched": same crops, same keys, near-identical pixels, fallbacks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipeline import MAEAugment, TooManyBadSamples, make_loader, write_shards
from data_pipeline.augment import RawJPEG, decode_batch, raw_jpeg

SIZE = 48
B = 4


def _compare(cpu: list[dict], bat: list[dict]) -> None:
    assert len(cpu) == len(bat)
    for x, y in zip(cpu, bat):
        assert x["key"] == y["key"]
        assert torch.equal(x["label"], y["label"])
        assert y["image"].dtype == torch.uint8 and y["image"].shape == x["image"].shape
        diff = (x["image"].float() - y["image"].float()).abs().mean(dim=(1, 2, 3))
        assert diff.max().item() < 1.0, diff


@pytest.mark.parametrize("kw", [dict(num_workers=0), dict(num_workers=2, world_size=2, rank=1),
                                dict(resampled=True, epoch_samples=24, seed=3)])
def test_batched_matches_cpu_path(shard_dir: Path, kw: dict):
    cpu = list(make_loader(shard_dir, B, input_size=SIZE, **kw))
    bat = list(make_loader(shard_dir, B, input_size=SIZE, decode_device="cpu-batched", **kw))
    _compare(cpu, bat)


def test_same_crop_parameters(sample_dir: Path):
    aug = MAEAugment(SIZE)
    for f in sorted((sample_dir / "train").glob("*/*.JPEG"))[:5]:
        data = f.read_bytes()
        raw = raw_jpeg(data, aug, torch.Generator().manual_seed(11))
        assert isinstance(raw, RawJPEG)
        g = torch.Generator().manual_seed(11)
        with Image.open(f) as im:
            assert raw.size == (im.height, im.width)
            assert raw.params == aug.params(im.height, im.width, g)
        (img,) = decode_batch([raw], aug, "cpu")
        assert torch.equal(img, aug(data, 11))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_fallbacks_and_bad_jpeg(sample_dir: Path, tmp_path: Path):
    """PNG, CMYK and grayscale JPEGs next to plain ones; a JPEG with a good header but a broken
    body is only found by the batched decode: counted, its slot filled from the batch."""
    files = sorted((sample_dir / "train").glob("*/*.JPEG"))[:13]
    src = tmp_path / "src" / "n0000_x"
    src.mkdir(parents=True)
    for f in files[:9]:
        (src / f.name).write_bytes(f.read_bytes())
    rgb = Image.open(files[9]).convert("RGB")
    (src / "cmyk.jpg").write_bytes(_encode(rgb.convert("CMYK"), "JPEG", quality=95))
    (src / "gray.jpg").write_bytes(_encode(rgb.convert("L"), "JPEG"))
    (src / "pic.png").write_bytes(_encode(rgb, "PNG"))
    aug = MAEAugment(SIZE)
    assert raw_jpeg((src / "cmyk.jpg").read_bytes(), aug, torch.Generator()) is None
    assert raw_jpeg((src / "pic.png").read_bytes(), aug, torch.Generator()) is None
    write_shards(tmp_path / "src", tmp_path / "sh", samples_per_shard=4, progress=False)
    cpu = list(make_loader(tmp_path / "sh", B, input_size=SIZE))
    ld = make_loader(tmp_path / "sh", B, input_size=SIZE, decode_device="cpu-batched")
    _compare(cpu, list(ld))
    assert not ld.bad_counts

    broken = files[12].read_bytes()
    (src / "zbroken.jpg").write_bytes(broken[:600] + b"\0" * 3000)
    (tmp_path / "src" / "extra").mkdir()  # a second class keeps the total at 16
    for f in files[10:13]:
        (tmp_path / "src" / "extra" / f.name).write_bytes(f.read_bytes())
    write_shards(tmp_path / "src", tmp_path / "sh2", samples_per_shard=4, progress=False)
    ld = make_loader(tmp_path / "sh2", B, input_size=SIZE, decode_device="cpu-batched",
                     max_bad_fraction=0.2)
    batches = list(ld)
    assert len(batches) == len(ld) == 4 and all(b["image"].shape[0] == B for b in batches)
    assert dict(ld.bad_counts) == {"undecodable": 1}
    assert not any("zbroken" in k for b in batches for k in b["key"])
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction"):
        list(make_loader(tmp_path / "sh2", B, input_size=SIZE, decode_device="cpu-batched"))


def test_cuda_without_gpu_is_a_clear_error(shard_dir: Path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        make_loader(shard_dir, B, decode_device="cuda")
    with pytest.raises(ValueError, match="MAEAugment"):
        make_loader(shard_dir, B, decode_device="cpu-batched", augment=lambda d, g: d)


# The CUDA path itself (nvJPEG on a GPU) is checked in tests/cuda/test_nvjpeg_decode.py (marker `cuda`).
