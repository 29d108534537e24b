"""make_eval_loader: every sample exactly once over ranks (uneven splits), no shuffle, partial last
batch, worker split, bad samples skipped and counted, missing labels -> -1."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline import read_manifest, write_shards
from data_pipeline.eval_stream import make_eval_loader, split_range
from data_pipeline.finetune_augment import EvalTransform
from data_pipeline.tario import iter_tar_samples
from batch_asserts import keys_of

SIZE = 32
N_GOOD = 23  # uneven over 2 and 3 ranks


def _labelled_dir(sample_dir: Path, root: Path, n: int, extra: dict[str, bytes]) -> Path:
    """ImageNet-style folder of the first ``n`` sample photos (two classes) plus ``extra`` files."""
    photos = sorted((sample_dir / "train").glob("*/*.JPEG"))[:n]
    for k, f in enumerate(photos):
        d = root / "src" / f"n000{k % 2}_c"
        d.mkdir(parents=True, exist_ok=True)
        (d / f.name).write_bytes(f.read_bytes())
    for name, data in extra.items():
        (root / "src" / "n0000_c" / name).write_bytes(data)
    return root / "src"


def _truth(shards: Path) -> list[tuple[str, int]]:
    """(key, label) of every sample, in the manifest's shard order."""
    out = []
    for s in read_manifest(shards)["shards"]:
        with open(shards / s["name"], "rb") as f:
            out.extend((key, int(m["cls"])) for _, key, m in iter_tar_samples(f))
    return out


@pytest.fixture(scope="module")
def uneven_shards(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval_uneven")
    src = _labelled_dir(sample_dir, root, N_GOOD, {})
    write_shards(src, root / "sh", samples_per_shard=6, progress=False)  # 6, 6, 6, 5
    return root / "sh"


def test_split_range_is_contiguous_and_uneven():
    assert [split_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [split_range(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (3, 2)])
def test_eval_every_sample_once_over_ranks(uneven_shards: Path, world_size: int, num_workers: int):
    truth = _truth(uneven_shards)
    assert len(truth) == N_GOOD
    B = 3
    keys, labels, counts = [], {}, []
    for rank in range(world_size):
        ld = make_eval_loader(uneven_shards, B, rank=rank, world_size=world_size,
                              num_workers=num_workers, transform=EvalTransform(SIZE))
        batches = list(ld)
        counts.append(ld.num_samples)
        assert sum(len(b["key"]) for b in batches) == ld.num_samples
        assert len(batches) == len(ld)
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, SIZE, SIZE)
            assert b["label"].dtype == torch.int64
            assert b["image"].shape[0] == len(b["key"]) == b["label"].shape[0]
            labels.update(zip(b["key"], b["label"].tolist()))
        # only one batch of the rank may be short
        assert sum(len(b["key"]) < B for b in batches) <= 1
        assert ld.bad_counts == {}
        keys.extend(keys_of(batches))
    assert counts == [split_range(N_GOOD, world_size, r)[1] - split_range(N_GOOD, world_size, r)[0]
                      for r in range(world_size)]
    assert sorted(keys) == sorted(k for k, _ in truth)  # exactly once: no duplicates, none lost
    assert labels == dict(truth)
    if num_workers == 0:  # unshuffled: ranks in turn give the manifest order
        assert keys == [k for k, _ in truth]


def test_eval_partial_last_batch_and_deterministic(uneven_shards: Path):
    ld = make_eval_loader(uneven_shards, 5, rank=0, world_size=2, transform=EvalTransform(SIZE))
    batches = list(ld)
    assert ld.num_samples == 12
    assert [len(b["key"]) for b in batches] == [5, 5, 2]
    again = list(ld)
    assert all(torch.equal(a["image"], b["image"]) and a["key"] == b["key"]
               for a, b in zip(batches, again))


def test_eval_workers_read_their_share_once(uneven_shards: Path):
    one = list(make_eval_loader(uneven_shards, 4, transform=EvalTransform(SIZE)))
    two = list(make_eval_loader(uneven_shards, 4, num_workers=2, transform=EvalTransform(SIZE)))
    assert sorted(keys_of(two)) == sorted(keys_of(one)) and len(set(keys_of(two))) == N_GOOD
    assert sorted(len(b["key"]) for b in two) == sorted(len(b["key"]) for b in one)
    by_key = {k: img for b in one for k, img in zip(b["key"], b["image"])}
    assert all(torch.equal(by_key[k], img) for b in two for k, img in zip(b["key"], b["image"]))


def test_eval_bad_samples_skipped_and_counted(sample_dir: Path, tmp_path: Path):
    src = _labelled_dir(sample_dir, tmp_path, 10,
                        {"not_an_image.jpg": b"hello, I am text", "empty.jpg": b""})
    write_shards(src, tmp_path / "sh", samples_per_shard=4, progress=False)
    good = [k for k, _ in _truth(tmp_path / "sh") if "not_an_image" not in k and "empty" not in k]
    assert len(good) == 10
    for nw in (0, 2):
        keys = []
        total: Counter[str] = Counter()
        for rank in range(2):
            ld = make_eval_loader(tmp_path / "sh", 3, rank=rank, world_size=2, num_workers=nw,
                                  transform=EvalTransform(SIZE))
            keys += keys_of(list(ld))
            total.update(ld.bad_counts)
            assert ld.num_samples == 6  # 12 assigned; bad ones still count as assigned
        assert dict(total) == {"undecodable": 1, "empty": 1}
        assert sorted(keys) == sorted(good)


def test_eval_unlabelled_gets_minus_one(sample_dir: Path, tmp_path: Path):
    src = tmp_path / "plain"
    src.mkdir()
    for f in sorted((sample_dir / "train").glob("*/*.JPEG"))[:5]:
        (src / f.name).write_bytes(f.read_bytes())
    write_shards(src, tmp_path / "sh", samples_per_shard=2, progress=False)
    batches = list(make_eval_loader(tmp_path / "sh", 8, transform=EvalTransform(SIZE)))
    assert len(batches) == 1 and batches[0]["label"].tolist() == [-1] * 5


def test_eval_loader_argument_checks(uneven_shards: Path):
    with pytest.raises(ValueError, match="rank"):
        make_eval_loader(uneven_shards, 2, rank=2, world_size=2, transform=EvalTransform(SIZE))
    with pytest.raises(ValueError, match="batch_size"):
        make_eval_loader(uneven_shards, 0, transform=EvalTransform(SIZE))
