"""make_loader(resampled=True): with-replacement epochs of a fixed length, deterministic, exact
resume, equal lengths, rank-specific streams."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline import make_loader
from batch_asserts import assert_same_batches, keys_of

SIZE = 32
B = 4


def _run(shards, **kw) -> list[dict]:
    kw.setdefault("input_size", SIZE)
    return list(make_loader(shards, B, resampled=True, **kw))


def test_length(shard_dir: Path, sizes: dict):
    # epoch_samples // (world_size * B) rounded down to a multiple of the worker count
    for es, nw, expect in ((None, 0, sizes["n_images"] // 8), (100, 2, 12), (90, 2, 10),
                           (90, 3, 9), (200, 0, 25)):
        lens = {len(make_loader(shard_dir, B, rank=r, world_size=2, num_workers=nw,
                                resampled=True, epoch_samples=es)) for r in range(2)}
        assert lens == {expect}, (es, nw)
    batches = _run(shard_dir, world_size=2, rank=1, num_workers=2, epoch_samples=90)
    assert len(batches) == 10 and all(b["image"].shape == (B, 3, SIZE, SIZE) for b in batches)


def test_deterministic_and_with_replacement(shard_dir: Path, sizes: dict):
    a = _run(shard_dir, num_workers=2, seed=5, epoch_samples=120)
    assert_same_batches(a, _run(shard_dir, num_workers=2, seed=5, epoch_samples=120))
    keys = keys_of(a)
    assert len(keys) == 120 and len(set(keys)) < len(keys)  # repeats: drawn with replacement
    assert len(set(keys)) > sizes["n_images"] // 2
    assert keys_of(_run(shard_dir, num_workers=2, seed=5, epoch=1, epoch_samples=120)) != keys
    assert keys_of(_run(shard_dir, num_workers=2, seed=6, epoch_samples=120)) != keys
    # a sample drawn twice gets two different crops
    first: dict[str, torch.Tensor] = {}
    differ = 0
    for b in a:
        for k, img in zip(b["key"], b["image"]):
            if k in first:
                differ += not torch.equal(first[k], img)
            first.setdefault(k, img)
    assert differ > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_equals_tail_of_full_run(shard_dir: Path, num_workers: int):
    kw = dict(num_workers=num_workers, world_size=2, rank=1, epoch_samples=64, seed=2)
    full = _run(shard_dir, **kw)
    for k in (1, 3, len(full) - 1):
        ld = make_loader(shard_dir, B, resampled=True, skip_samples=k * B, input_size=SIZE, **kw)
        assert len(ld) == len(full) and ld.remaining == len(full) - k
        assert_same_batches(list(ld), full[k:])


def test_ranks_get_different_samples(shard_dir: Path):
    per_rank = [keys_of(_run(shard_dir, rank=r, world_size=2, num_workers=2, epoch_samples=96))
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 48
    assert per_rank[0] != per_rank[1]
    assert set(per_rank[0]) != set(per_rank[1])


def test_epoch_samples_needs_resampled(shard_dir: Path):
    with pytest.raises(ValueError, match="resampled"):
        make_loader(shard_dir, B, epoch_samples=10)
    with pytest.raises(ValueError, match="epoch_samples"):
        make_loader(shard_dir, B, resampled=True, epoch_samples=3, world_size=1)
