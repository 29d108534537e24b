"""write_shards / read_manifest / verify_shards: labels, original bytes, counts, idempotence."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from data_pipeline import MANIFEST_FORMAT, read_manifest, verify_shards, write_shards

N_IMAGES, PER_SHARD = 48, 8  # as made by conftest.py (checked in test_manifest_counts...)


def _read_all(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard in the manifest."""
    out: dict[str, dict[str, bytes]] = {}
    for s in read_manifest(shard_dir)["shards"]:
        with tarfile.open(shard_dir / s["name"]) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_labels_follow_sorted_synsets_and_bytes_are_original(sample_dir: Path, shard_dir: Path):
    classes = sorted(p.name for p in (sample_dir / "train").iterdir())
    samples = _read_all(shard_dir)
    files = sorted((sample_dir / "train").glob("*/*.JPEG"))
    assert len(samples) == len(files) == N_IMAGES
    for f in files:
        s = samples[f"{f.parent.name}/{f.stem}"]
        assert s["jpg"] == f.read_bytes()  # never re-encoded
        assert int(s["cls"]) == classes.index(f.parent.name)


def test_manifest_counts_and_mixing(sample_dir: Path, shard_dir: Path, sizes: dict):
    assert (N_IMAGES, PER_SHARD) == (sizes["n_images"], sizes["per_shard"])
    m = read_manifest(shard_dir / "manifest.json")
    assert m["format"] == MANIFEST_FORMAT and m["prefix"] == "train"
    assert m["total"] == N_IMAGES
    assert [s["samples"] for s in m["shards"]] == [PER_SHARD] * (N_IMAGES // PER_SHARD)
    assert [s["name"] for s in m["shards"]] == [f"train-{i:06d}.tar" for i in range(6)]
    assert m["classes"] == sorted(p.name for p in (sample_dir / "train").iterdir())
    assert m["num_classes"] == len(m["classes"])
    for s in m["shards"]:
        assert (shard_dir / s["name"]).stat().st_size == s["bytes"]
    # the seed shuffle mixes classes: no shard holds a single class
    with tarfile.open(shard_dir / "train-000000.tar") as tf:
        labels = {tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".cls")}
    assert len(labels) > 1
    assert verify_shards(shard_dir) == []


def test_rerun_writes_only_missing_shards(sample_dir: Path, tmp_path: Path):
    out = tmp_path / "sh"
    first = write_shards(sample_dir, out, samples_per_shard=PER_SHARD, progress=False)
    (out / "train-000002.tar").unlink()
    # what an interrupted run leaves behind: a hidden partial temp file
    (out / ".train-000002.tar.tmp-123-456").write_bytes(b"partial")
    mtime = (out / "train-000001.tar").stat().st_mtime_ns
    second = write_shards(sample_dir, out, samples_per_shard=PER_SHARD, progress=False)
    assert second == first  # byte-identical rewrite: same sha256
    assert (out / "train-000001.tar").stat().st_mtime_ns == mtime  # kept, not rewritten
    assert json.loads((out / "manifest.json").read_text()) == first
    assert verify_shards(out) == []


def test_other_settings_in_same_dir_refused(sample_dir: Path, tmp_path: Path):
    write_shards(sample_dir, tmp_path, samples_per_shard=PER_SHARD, progress=False)
    with pytest.raises(ValueError, match="different"):
        write_shards(sample_dir, tmp_path, samples_per_shard=PER_SHARD, seed=1, progress=False)


def test_verify_finds_damage(sample_dir: Path, tmp_path: Path):
    write_shards(sample_dir, tmp_path, samples_per_shard=PER_SHARD, progress=False)
    p = tmp_path / "train-000003.tar"
    data = bytearray(p.read_bytes())
    data[1000] ^= 0xFF  # inside the first image's bytes
    p.write_bytes(bytes(data))
    (tmp_path / "train-000004.tar").unlink()
    problems = verify_shards(tmp_path)
    assert any("train-000003.tar: sha256" in x for x in problems)
    assert any("train-000004.tar: missing" in x for x in problems)


def test_plain_folder_and_file_list(sample_dir: Path, tmp_path: Path):
    files = sorted((sample_dir / "train").glob("*/*.JPEG"))[:10]
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in files:
        shutil.copy(f, plain / f.name)
    m = write_shards(plain, tmp_path / "a", samples_per_shard=4, progress=False)
    assert (m["total"], m["num_classes"], m["classes"]) == (10, 0, None)
    assert all("cls" not in s for s in _read_all(tmp_path / "a").values())

    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{f}\t{i % 3}\n" for i, f in enumerate(files)))
    m = write_shards(lst, tmp_path / "b", samples_per_shard=4, progress=False)
    assert (m["total"], m["num_classes"]) == (10, 3)
    by_bytes = {s["jpg"]: int(s["cls"]) for s in _read_all(tmp_path / "b").values()}
    assert [by_bytes[f.read_bytes()] for f in files] == [i % 3 for i in range(10)]
    assert verify_shards(tmp_path / "b") == []


def test_max_bytes_per_shard(sample_dir: Path, tmp_path: Path):
    sizes = sorted(f.stat().st_size for f in (sample_dir / "train").glob("*/*.JPEG"))
    limit = 4 * sizes[-1] + 20_000  # room for ~4-6 samples: bytes, not the count, decide
    m = write_shards(sample_dir, tmp_path / "a", samples_per_shard=100,
                     max_bytes_per_shard=limit, progress=False)
    assert m["max_bytes_per_shard"] == limit and m["samples_per_shard"] == 100
    assert m["total"] == N_IMAGES and len(m["shards"]) > 1
    for s in m["shards"]:
        assert s["bytes"] <= limit
    assert verify_shards(tmp_path / "a") == []
    # both limits: whichever comes first closes the shard
    m2 = write_shards(sample_dir, tmp_path / "b", samples_per_shard=3,
                      max_bytes_per_shard=limit, progress=False)
    assert all(s["samples"] <= 3 and s["bytes"] <= limit for s in m2["shards"])
    # deterministic plan: a fresh directory gets byte-identical shards
    again = write_shards(sample_dir, tmp_path / "c", samples_per_shard=100,
                         max_bytes_per_shard=limit, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    # idempotent: a rerun after losing a shard rewrites only that one, identically
    (tmp_path / "a" / "train-000001.tar").unlink()
    mtime = (tmp_path / "a" / "train-000000.tar").stat().st_mtime_ns
    assert write_shards(sample_dir, tmp_path / "a", samples_per_shard=100,
                        max_bytes_per_shard=limit, progress=False) == m
    assert (tmp_path / "a" / "train-000000.tar").stat().st_mtime_ns == mtime
    # another byte limit is another plan
    with pytest.raises(ValueError, match="different"):
        write_shards(sample_dir, tmp_path / "a", samples_per_shard=100,
                     max_bytes_per_shard=limit * 2, progress=False)
    # a sample larger than the limit gets a shard of its own
    tiny = write_shards(sample_dir, tmp_path / "d", max_bytes_per_shard=1, progress=False)
    assert [s["samples"] for s in tiny["shards"]] == [1] * N_IMAGES
    with pytest.raises(ValueError, match="max_bytes_per_shard"):
        write_shards(sample_dir, tmp_path / "e", max_bytes_per_shard=0, progress=False)


def test_byte_limit_is_tight(sample_dir: Path, tmp_path: Path):
    """Each shard but the last is closed only because its successor's first sample would not
    have fitted: the planned size equals the written size, so the plan is exact."""
    from data_pipeline.shards import _collect, _sample_bytes, _tar_bytes

    limit = 60_000
    m = write_shards(sample_dir, tmp_path, samples_per_shard=1000, max_bytes_per_shard=limit,
                     progress=False)
    items = {it.key: it for it in _collect(sample_dir)[0]}
    shard_items = []
    for s in m["shards"]:
        with tarfile.open(tmp_path / s["name"]) as tf:
            keys = list(dict.fromkeys(x.name.split(".")[0] for x in tf.getmembers()))
        shard_items.append([items[k] for k in keys])
        assert _tar_bytes(sum(_sample_bytes(it) for it in shard_items[-1])) == s["bytes"]
    for cur, nxt in zip(shard_items, shard_items[1:]):
        assert _tar_bytes(sum(_sample_bytes(it) for it in cur + nxt[:1])) > limit
