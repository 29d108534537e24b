"""make_sample_folder / builtin_shards: real RGB JPEGs, deterministic, idempotent, race-safe."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from PIL import Image

from data_pipeline import builtin_shards, make_sample_folder, read_manifest, verify_shards


def test_sample_folder_is_deterministic_rgb_jpeg(tmp_path: Path):
    a = make_sample_folder(tmp_path / "a", n_images=20, seed=5, min_side=120, max_side=200)
    b = make_sample_folder(tmp_path / "b", n_images=20, seed=5, min_side=120, max_side=200)
    files = sorted((a / "train").glob("*/*.JPEG"))
    assert len(files) == 20
    assert len({f.parent.name for f in files}) >= 6  # astronaut, chelsea, coffee, rocket, ...
    assert all(f.parent.name.startswith("n") for f in files)
    for f in files:
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert 120 <= min(im.size) and max(im.size) <= 200
    # a second call finds the finished folder and writes nothing
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert make_sample_folder(a, n_images=20, seed=5, min_side=120, max_side=200) == a
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def _builtin(cache: str, q: mp.Queue) -> None:
    q.put(str(builtin_shards(cache, n_images=24, samples_per_shard=8)))


def test_builtin_shards_once_even_when_raced(tmp_path: Path):
    ctx = mp.get_context("spawn")  # a fresh interpreter, like two ranks starting together
    q = ctx.Queue()
    procs = [ctx.Process(target=_builtin, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    paths = {q.get(timeout=5), q.get(timeout=5)}
    assert len(paths) == 1
    shard_dir = Path(paths.pop())
    assert read_manifest(shard_dir)["total"] == 24 and verify_shards(shard_dir) == []
    assert builtin_shards(tmp_path, n_images=24, samples_per_shard=8) == shard_dir
    assert [p.name for p in tmp_path.iterdir()] == [shard_dir.parent.name]  # no temp dirs left
