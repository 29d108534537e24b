"""make_loader: exactly-once split over ranks x workers, determinism, exact resume, bad samples."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from data_pipeline import TooManyBadSamples, make_loader, read_manifest, write_shards
from batch_asserts import assert_same_batches, keys_of

SIZE = 64
B = 4


def _run(shards, **kw) -> list[dict]:
    kw.setdefault("input_size", SIZE)
    return list(make_loader(shards, B, **kw))


def test_batch_format(shard_dir: Path):
    batch = next(iter(make_loader(shard_dir, B, input_size=SIZE)))
    assert set(batch) == {"image", "key", "label"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (B, 3, SIZE, SIZE)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (B,)
    assert len(batch["key"]) == B and all((batch["label"] >= 0).tolist())


def test_exactly_once_over_2_ranks_x_2_workers(shard_dir: Path, sizes: dict):
    loaders = [make_loader(shard_dir, B, rank=r, world_size=2, num_workers=2, input_size=SIZE)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == sizes["n_images"] // (2 * B)
    keys = []
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == len(ld)
        keys += keys_of(batches)
    manifest_keys = set()
    for s in read_manifest(shard_dir)["shards"]:
        with tarfile.open(shard_dir / s["name"]) as tf:
            manifest_keys |= {m.name.split(".")[0] for m in tf.getmembers()}
    assert len(keys) == len(set(keys)) == sizes["n_images"]
    assert set(keys) == manifest_keys


def test_remainder_dropped_and_lengths_equal(shard_dir: Path):
    # 48 samples over 3 ranks x 2 workers = 8 per range -> 2 batches of 4 per worker, nothing
    # dropped; with batch 5, 8 -> 5 per range: 18 of 48 dropped, 1 batch per worker
    for bs, expect in ((4, 4), (5, 2)):
        lens = {len(make_loader(shard_dir, bs, rank=r, world_size=3, num_workers=2))
                for r in range(3)}
        assert lens == {expect}


def test_same_arguments_same_batches(shard_dir: Path):
    assert_same_batches(_run(shard_dir, num_workers=2, seed=3), _run(shard_dir, num_workers=2, seed=3))
    assert_same_batches(_run(shard_dir, seed=3), _run(shard_dir, seed=3))


def test_other_epoch_other_order(shard_dir: Path):
    e0, e1 = keys_of(_run(shard_dir, epoch=0)), keys_of(_run(shard_dir, epoch=1))
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert keys_of(_run(shard_dir, seed=1)) != e0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_equals_tail_of_full_run(shard_dir: Path, num_workers: int):
    full = _run(shard_dir, num_workers=num_workers, world_size=2, rank=1)
    for k in (1, 3, len(full) - 1):  # odd k: round robin resumes at worker 1
        ld = make_loader(shard_dir, B, num_workers=num_workers, world_size=2, rank=1,
                         skip_samples=k * B, input_size=SIZE)
        assert len(ld) == len(full) and ld.remaining == len(full) - k
        assert_same_batches(list(ld), full[k:])


def test_skip_must_be_whole_batches(shard_dir: Path):
    with pytest.raises(ValueError, match="multiple of batch_size"):
        make_loader(shard_dir, B, skip_samples=B + 1)
    with pytest.raises(ValueError, match="more than"):
        make_loader(shard_dir, B, skip_samples=100 * B)


def test_crops_do_not_depend_on_split(shard_dir: Path):
    """Augmentation randomness follows the sample's epoch position, not rank or worker."""
    one = {k: img for b in _run(shard_dir) for k, img in zip(b["key"], b["image"])}
    for r in range(2):
        for b in _run(shard_dir, rank=r, world_size=2, num_workers=2):
            for k, img in zip(b["key"], b["image"]):
                assert torch.equal(img, one[k])


def test_shard_spellings_agree(shard_dir: Path):
    names = [s["name"] for s in read_manifest(shard_dir)["shards"]]
    ref = keys_of(_run(shard_dir))
    assert keys_of(_run(shard_dir / "manifest.json")) == ref
    assert keys_of(_run(f"{shard_dir}/train-{{000000..{len(names) - 1:06d}}}.tar")) == ref
    assert keys_of(_run([f"pipe:cat {shard_dir / n}" for n in names])) == ref  # counted by reading


def _bad_shards(sample_dir: Path, tmp: Path) -> Path:
    """Shards of 22 good images + a text file named .jpg + a zero-byte .jpg."""
    src = tmp / "src" / "n0000_x"
    src.mkdir(parents=True)
    for f in sorted((sample_dir / "train").glob("*/*.JPEG"))[:22]:
        (src / f.name).write_bytes(f.read_bytes())
    (src / "not_an_image.jpg").write_bytes(b"hello, I am text")
    (src / "empty.jpg").write_bytes(b"")
    write_shards(tmp / "src", tmp / "sh", samples_per_shard=6, progress=False)
    return tmp / "sh"


def test_bad_samples_skipped_and_counted(sample_dir: Path, tmp_path: Path):
    sh = _bad_shards(sample_dir, tmp_path)
    for nw in (0, 2):
        ld = make_loader(sh, B, num_workers=nw, input_size=SIZE, max_bad_fraction=0.2)
        batches = list(ld)
        assert len(batches) == len(ld) == 24 // B  # epoch length unchanged, batches full
        assert all(b["image"].shape[0] == B for b in batches)
        assert dict(ld.bad_counts) == {"undecodable": 1, "empty": 1}
        keys = set(keys_of(batches))
        assert not any("not_an_image" in k or "empty" in k for k in keys)
        assert len(keys) == 22  # every good sample is still there
        # refilled batches are still a function of their own positions: resume stays exact
        for k in (1, 3):
            tail = list(make_loader(sh, B, num_workers=nw, input_size=SIZE, max_bad_fraction=0.2,
                                    skip_samples=k * B))
            assert_same_batches(tail, batches[k:])
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction"):
        list(make_loader(sh, B, input_size=SIZE))  # default limit 1 %


def test_malformed_members(sample_dir: Path, tmp_path: Path):
    """A sample without an image member and one with a non-integer .cls, in a tar written by
    hand (no manifest: samples are counted by reading)."""
    jpgs = sorted((sample_dir / "train").glob("*/*.JPEG"))[:6]
    path = tmp_path / "hand-000000.tar"
    with tarfile.open(path, "w") as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for i, f in enumerate(jpgs):
            add(f"s{i}.jpg", f.read_bytes())
            add(f"s{i}.cls", b"x7" if i == 2 else str(i).encode())
        add("s6.cls", b"1")  # no image
        add("s7.txt", b"no image either")
    ld = make_loader([str(path)], 2, input_size=SIZE, max_bad_fraction=0.5, shuffle_buffer=1)
    batches = list(ld)
    assert len(batches) == 4  # the last batch (s6, s7) is all bad: topped up from s0
    assert_same_batches(list(make_loader([str(path)], 2, input_size=SIZE, max_bad_fraction=0.5,
                                  shuffle_buffer=1, skip_samples=6)), batches[3:])
    assert dict(ld.bad_counts) == {"bad_label": 1, "no_image": 2}
    assert set(keys_of(batches)) == {"s0", "s1", "s3", "s4", "s5"}
    for b in batches:
        for k, lab in zip(b["key"], b["label"].tolist()):
            assert lab == int(k[1:])
