"""Damaged or missing shards (real files, damaged on disk) cost their samples, never the run.

Each kind of damage is made on a copy of the shared 6 x 8-sample shard set; the tests check the
exactly-once bookkeeping (every rank the same length, the lost samples counted by kind, every
other sample still seen once), exact resume after the bad shard, one warning per shard, the
max_bad_fraction stop with its counts (also through worker processes), the evaluation stream,
and shards without a manifest.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline import DataInputError, TooManyBadSamples, make_loader, read_manifest
from data_pipeline.eval_stream import make_eval_loader
from data_pipeline.finetune_augment import EvalTransform
from data_pipeline.shard_read import count_shard
from batch_asserts import assert_same_batches, keys_of

SIZE = 32
B = 4
VICTIM = "train-000002.tar"
CUT_SAMPLE = 3  # truncation inside this sample's image: samples 0..2 of the shard survive


def _shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tf.getmembers()))


def _cut_inside(path: Path, sample: int) -> int:
    """Byte offset in the middle of ``sample``'s image data (members are KEY.jpg, KEY.cls)."""
    with tarfile.open(path) as tf:
        jpg = [m for m in tf.getmembers() if m.name.endswith(".jpg")][sample]
        return jpg.offset_data + jpg.size // 2


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[:_cut_inside(path, CUT_SAMPLE)])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not_a_tar":
        path.write_bytes(b"<html>404 Not Found</html>\n" * 40)
    elif how == "gzip_not_a_tar":  # compressed bytes under a .tar name that hold no tar
        path.write_bytes(gzip.compress(b"just some text, not a tar archive\n" * 200))
    elif how == "gzip_truncated":  # a compressed tar cut short inside the image of CUT_SAMPLE
        path.write_bytes(gzip.compress(data[:_cut_inside(path, CUT_SAMPLE)])[:-40])
    elif how == "directory":  # nothing can be read from it (IsADirectoryError)
        path.unlink()
        path.mkdir()
    else:
        raise AssertionError(how)


# damage -> (kind counted, samples of the 8 that survive)
DAMAGE = {
    "missing": ("missing_shard", 0),
    "truncated": ("truncated_shard", CUT_SAMPLE),
    "empty": ("unreadable_shard", 0),
    "not_a_tar": ("unreadable_shard", 0),
    "gzip_not_a_tar": ("unreadable_shard", 0),
    "gzip_truncated": ("truncated_shard", CUT_SAMPLE),
    "directory": ("unreadable_shard", 0),
}


def _copy(shard_dir: Path, dst: Path) -> Path:
    shutil.copytree(shard_dir, dst)
    return dst


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_damaged_shard_is_skipped_counted_and_resumes_exactly(
        shard_dir: Path, tmp_path: Path, how: str, num_workers: int, caplog):
    sh = _copy(shard_dir, tmp_path / "sh")
    victim_keys = _shard_keys(sh / VICTIM)
    all_keys = {k for s in read_manifest(sh)["shards"] for k in _shard_keys(sh / s["name"])}
    kind, survive = DAMAGE[how]
    _damage(sh / VICTIM, how)
    lost = set(victim_keys[survive:])

    caplog.set_level(logging.WARNING)
    kw = dict(world_size=2, num_workers=num_workers, input_size=SIZE, max_bad_fraction=0.75)
    undamaged_len = len(make_loader(shard_dir, B, rank=0, **kw))
    keys, bad = [], Counter()
    for rank in range(2):
        ld = make_loader(sh, B, rank=rank, **kw)
        batches = list(ld)
        assert len(ld) == len(batches) == undamaged_len  # same length on every rank
        assert all(b["image"].shape[0] == B for b in batches)  # lost slots refilled
        keys += keys_of(batches)
        bad.update(ld.bad_counts)
        # resume mid-epoch after the bad shard: exactly the uninterrupted run's batches
        for k in (1, 3):
            tail = list(make_loader(sh, B, rank=rank, skip_samples=k * B, **kw))
            assert_same_batches(tail, batches[k:])
    assert dict(bad) == {kind: len(lost)}  # every promised sample counted, by its kind
    assert set(keys) == all_keys - lost  # every other sample still there
    warnings = [r.getMessage() for r in caplog.records if "skipping shard" in r.getMessage()]
    assert len(warnings) == 1 and str(sh / VICTIM) in warnings[0] and kind in warnings[0]


def test_gzip_compressed_tar_under_tar_name_is_read_in_full(shard_dir: Path, tmp_path: Path):
    """A compressed tar loses nothing: its samples are all there (webdataset reads it too)."""
    sh = _copy(shard_dir, tmp_path / "sh")
    (sh / VICTIM).write_bytes(gzip.compress((sh / VICTIM).read_bytes()))
    ref = list(make_loader(shard_dir, B, input_size=SIZE))
    ld = make_loader(sh, B, input_size=SIZE)
    assert_same_batches(list(ld), ref)
    assert not ld.bad_counts


def test_failing_pipe_command_counts_as_unreadable_or_truncated(shard_dir: Path, tmp_path: Path):
    """An I/O error as a reader sees it: the command feeding a shard fails, before its first
    sample or part-way through (a real subprocess exiting non-zero)."""
    names = [s["name"] for s in read_manifest(shard_dir)["shards"]]
    cut = _cut_inside(shard_dir / names[1], CUT_SAMPLE)
    urls = [f"pipe:cat {shard_dir / n}" for n in names]
    counts = [8] * len(names)
    urls[0] = f"pipe:cat {shard_dir / names[0]} >/dev/null; echo 'disk error' >&2; exit 5"
    # the data first, the failure after it: webdataset's pipe raises as soon as it sees the
    # exit status, so without the pause the break could come before the data was read
    urls[1] = f"pipe:head -c {cut} {shard_dir / names[1]}; sleep 1; exit 5"
    from data_pipeline import ShardSet

    ss = ShardSet(tuple(urls), tuple(counts))  # what a manifest promises
    ld = make_loader(ss, B, input_size=SIZE, max_bad_fraction=0.5)
    batches = list(ld)
    assert len(batches) == 48 // B
    assert dict(ld.bad_counts) == {"unreadable_shard": 8, "truncated_shard": 8 - CUT_SAMPLE}
    assert_same_batches(list(make_loader(ss, B, input_size=SIZE, max_bad_fraction=0.5,
                                         skip_samples=5 * B)), batches[5:])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_too_many_bad_keeps_counts_through_workers(shard_dir: Path, tmp_path: Path,
                                                   num_workers: int):
    sh = _copy(shard_dir, tmp_path / "sh")
    _damage(sh / VICTIM, "missing")
    with pytest.raises(TooManyBadSamples) as e:
        list(make_loader(sh, B, num_workers=num_workers, input_size=SIZE))  # default 1 %
    first = str(e.value).splitlines()[0]
    # the line a CLI prints: counts, fraction, kind, the setting (not "Caught ... in worker")
    assert "samples (" in first and "%) were bad" in first and "missing_shard" in first
    assert "max_bad_fraction=0.01" in first and "Caught" not in first


@pytest.mark.parametrize("how", ["missing", "truncated", "not_a_tar"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_stream_skips_damaged_shard_and_counts(shard_dir: Path, tmp_path: Path, how: str,
                                                    num_workers: int):
    sh = _copy(shard_dir, tmp_path / "sh")
    order = [k for s in read_manifest(sh)["shards"] for k in _shard_keys(sh / s["name"])]
    victim_keys = _shard_keys(sh / VICTIM)
    kind, survive = DAMAGE[how]
    _damage(sh / VICTIM, how)
    lost = victim_keys[survive:]
    keys, bad = [], Counter()
    for rank in range(3):
        ld = make_eval_loader(sh, 5, rank=rank, world_size=3, num_workers=num_workers,
                              transform=EvalTransform(SIZE))
        keys += keys_of(list(ld))
        bad.update(ld.bad_counts)
        assert ld.num_samples == 16  # assigned by the manifest; lost ones still assigned
        if lost and ld.bad_shards:
            assert ld.bad_shards == {str(sh / VICTIM): kind}
    assert dict(bad) == {kind: len(lost)}
    assert sorted(keys) == sorted(k for k in order if k not in lost)  # the rest exactly once
    if num_workers == 0:
        assert keys == [k for k in order if k not in lost]  # still in order


def test_without_manifest_a_damaged_shard_counts_what_it_can(shard_dir: Path, tmp_path: Path,
                                                             caplog):
    """Shards given as a list or brace pattern with no manifest beside them are counted by
    reading: an unreadable one counts 0, a truncated one the samples before the break (so they
    are still used), each with one warning; nothing crashes resolve_shards."""
    names = [s["name"] for s in read_manifest(shard_dir)["shards"]]
    d = tmp_path / "nomanifest"
    d.mkdir()
    for n in names:
        shutil.copy(shard_dir / n, d / n)
    _damage(d / names[1], "truncated")
    _damage(d / names[4], "not_a_tar")
    (d / names[5]).unlink()
    caplog.set_level(logging.WARNING)
    pattern = f"{d}/train-{{000000..{len(names) - 1:06d}}}.tar"
    from data_pipeline import resolve_shards

    ss = resolve_shards(pattern)
    assert ss.counts == (8, CUT_SAMPLE, 8, 8, 0, 0)
    assert count_shard(str(d / names[1]))[1].kind == "truncated_shard"
    warned = [r.getMessage() for r in caplog.records if "skipping shard" in r.getMessage()]
    assert len(warned) == 3 and all(any(str(d / names[i]) in w for w in warned) for i in (1, 4, 5))
    ld = make_loader(pattern, B, input_size=SIZE, num_workers=2)
    keys = keys_of(list(ld))
    good = [k for i in (0, 2, 3) for k in _shard_keys(shard_dir / names[i])]
    good += _shard_keys(shard_dir / names[1])[:CUT_SAMPLE]
    # 27 readable samples over 2 workers: 12 each (the remainder of 3 is dropped), all good
    assert set(keys) <= set(good) and len(keys) == len(set(keys)) == 24
    assert not ld.bad_counts  # nothing was promised beyond what could be read
    # nothing readable at all is a one-line input error, not an empty run
    with pytest.raises(DataInputError, match="none of the 2 shard"):
        resolve_shards([str(d / names[4]), str(d / names[5])])
