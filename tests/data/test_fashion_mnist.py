"""Fashion-MNIST conversion, tested on IDX files made from scikit-learn's real 8x8 digits (so the
test does not need the Debian package): counts, labels, lossless pixels, idempotence, readers."""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digits_data import idx_bytes, write_digits_idx
from data_pipeline import make_loader, read_manifest, verify_shards
from data_pipeline.eval_stream import make_eval_loader
from mae_scale.cli.data import add_fashion_mnist_parser
from data_pipeline.fashion_mnist import (
    CLASSES,
    read_idx,
    write_fashion_mnist_shards,
)
from data_pipeline.finetune_augment import EvalTransform
from data_pipeline.tario import iter_tar_samples

N_TRAIN, N_VAL = 100, 30


@pytest.fixture(scope="module")
def digits_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    src = tmp_path_factory.mktemp("digits_idx")
    images, labels = write_digits_idx(src, N_TRAIN, N_VAL)
    return src, images, labels


def _samples(split_dir: Path) -> list[tuple[str, dict]]:
    out = []
    for s in read_manifest(split_dir)["shards"]:
        with open(split_dir / s["name"], "rb") as f:
            out.extend((k, m) for _, k, m in iter_tar_samples(f))
    return out


def test_read_idx_round_trip_plain_and_gz(tmp_path: Path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    for name in ("a", "a.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, arr)


def test_read_idx_refuses_bad_files(tmp_path: Path):
    arr = np.zeros((2, 2), np.uint8)
    (tmp_path / "magic").write_bytes(b"\x08\x03" + idx_bytes(arr)[2:])
    (tmp_path / "short").write_bytes(idx_bytes(arr)[:-1])
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for name, match in (("magic", "not an IDX file"), ("short", "header says"),
                        ("png", "not an IDX file")):
        with pytest.raises(ValueError, match=match) as e:
            read_idx(tmp_path / name)
        assert "\n" not in str(e.value)


def test_fashion_mnist_conversion(digits_src, tmp_path: Path):
    src, images, labels = digits_src
    out = tmp_path / "fm"
    paths = write_fashion_mnist_shards(out, src, samples_per_shard=40, progress=False)
    assert paths == {"train": out / "train" / "manifest.json", "val": out / "val" / "manifest.json"}
    assert json.loads((out / "classes.json").read_text()) == list(CLASSES)
    for split, n, offset in (("train", N_TRAIN, 0), ("val", N_VAL, N_TRAIN)):
        m = read_manifest(out / split)
        assert m["total"] == n and m["num_classes"] == 10 and m["classes"] == list(CLASSES)
        assert [s["samples"] for s in m["shards"]] == [min(40, n - s) for s in range(0, n, 40)]
        assert verify_shards(out / split) == []
        samples = _samples(out / split)
        assert len(samples) == n
        for i, (key, members) in enumerate(samples):
            assert set(members) == {"png", "cls"}
            img = Image.open(io.BytesIO(members["png"]))
            assert img.mode == "L" and img.size == (8, 8)
            assert np.array_equal(np.asarray(img), images[offset + i])  # lossless
            assert int(members["cls"]) == labels[offset + i]

    # a second call with the same inputs rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert write_fashion_mnist_shards(out, src, samples_per_shard=40, progress=False) == paths
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # the loaders read it: training (labels from .cls) and evaluation (every sample once)
    batch = next(iter(make_loader(out / "train", 8, input_size=16)))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["label"].max() < 10
    ev = list(make_eval_loader(out / "val", 16, transform=EvalTransform(8, crop_pct=1.0)))
    assert [b["label"].tolist() for b in ev] == [labels[N_TRAIN:N_TRAIN + 16].tolist(),
                                                 labels[N_TRAIN + 16:N_TRAIN + N_VAL].tolist()]
    grey = torch.from_numpy(images[N_TRAIN])
    assert all(torch.equal(ev[0]["image"][0, c], grey) for c in range(3))


def test_fashion_mnist_limits_and_cli(digits_src, tmp_path: Path, capsys):
    src, _, labels = digits_src
    parser = argparse.ArgumentParser()
    add_fashion_mnist_parser(parser.add_subparsers(dest="what", required=True))
    args = parser.parse_args(["fashion-mnist", str(tmp_path / "fm"), "--src", str(src),
                              "--train-limit", "25", "--val-limit", "7", "--quiet"])
    assert args.run(args) == 0
    assert read_manifest(tmp_path / "fm" / "train")["total"] == 25
    assert [int(m["cls"]) for _, m in _samples(tmp_path / "fm" / "val")] == \
        labels[N_TRAIN:N_TRAIN + 7].tolist()
    # other settings into the same directory: refused rather than mixed
    with pytest.raises(ValueError, match="already holds"):
        write_fashion_mnist_shards(tmp_path / "fm", src, train_limit=30, progress=False)


def test_fashion_mnist_missing_source_names_the_package(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        write_fashion_mnist_shards(tmp_path / "out", tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        write_fashion_mnist_shards(tmp_path / "out", tmp_path / "empty", progress=False)
