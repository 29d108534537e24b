"""The data verbs from the command line: make-shards, data verify, bench data."""

import json
import subprocess
import sys

from run_helpers import ROOT


def mae_scale(*args):
    return subprocess.run([sys.executable, "-m", "mae_scale", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_make_shards_verify_and_bench(tmp_path):
    from data_pipeline import make_sample_folder

    images = make_sample_folder(tmp_path / "images", n_images=40, seed=3)
    out = tmp_path / "shards"
    made = mae_scale("make-shards", images, out, "--samples-per-shard", 100, "--max-bytes-per-shard", 400_000)
    assert made.returncode == 0, made.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 40 and len(manifest["shards"]) > 1
    assert all(s["bytes"] <= 400_000 for s in manifest["shards"])

    ok = mae_scale("data", "verify", out)
    assert ok.returncode == 0 and "all shards match" in ok.stdout

    bench = mae_scale("bench", "data", out, "--workers", 0, "--repeats", 1, "--batch", 8, "--json")
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert result["samples"] == 40 and result["ratio"] > 0 and len(result["medians"]) == 2

    tar = out / manifest["shards"][0]["name"]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    bad = mae_scale("data", "verify", out)
    assert bad.returncode == 1 and manifest["shards"][0]["name"] in bad.stdout


def test_make_shards_missing_source_is_one_line(tmp_path):
    proc = mae_scale("make-shards", tmp_path / "nope", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.startswith("error: source") and "Traceback" not in proc.stderr


def _one_line_error(proc, *needles, before=()):
    """The contract of a data verb refusing its input: status 2, one `error:` line, no traceback
    (after the warning lines that name ``before``, e.g. a damaged shard skipped on the way)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 + len(before) and "Traceback" not in proc.stderr, proc.stderr
    assert all(what in line for what, line in zip(before, lines)), proc.stderr
    assert lines[-1].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def _bad_inputs(root):
    """(name, make-shards arguments, words the one line must hold) for each refused input."""
    from data_pipeline import make_sample_folder

    images = make_sample_folder(root / "images", n_images=6, seed=0, min_side=64, max_side=96)
    one = next((images / "train").glob("*/*.JPEG"))
    (root / "empty").mkdir()
    clash = root / "clash"
    clash.mkdir()
    (clash / "a.jpg").write_bytes(one.read_bytes())
    (clash / "a.JPEG").write_bytes(one.read_bytes())  # same key "a"
    (root / "missing.txt").write_text(f"{one}\t0\n{root / 'gone.jpg'}\t1\n")
    (root / "label.txt").write_text(f"{one}\tcat\n")
    (root / "a_file").write_text("not a directory")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "other-000.tar").write_bytes(b"")
    loop_file = root / "loopfile"
    loop_file.mkdir()
    (loop_file / "x.jpg").symlink_to(loop_file / "x.jpg")  # a symlink to itself
    out = root / "out"
    return [
        ("empty source folder", [root / "empty", out], ["no images found"]),
        ("two files, one key", [clash, out], ["same sample key", "a.jpg", "a.JPEG"]),
        ("list names a missing file", [root / "missing.txt", out], ["missing.txt:2", "gone.jpg"]),
        ("list with a non-integer label", [root / "label.txt", out], ["label.txt:1", "'cat'"]),
        ("zero samples per shard", [images, out, "--samples-per-shard", 0], ["samples_per_shard"]),
        ("negative samples per shard", [images, out, "--samples-per-shard", -5], ["samples_per_shard"]),
        ("zero max bytes", [images, out, "--max-bytes-per-shard", 0], ["max_bytes_per_shard"]),
        ("output is a file", [images, root / "a_file"], ["is a file"]),
        ("output holds foreign tars", [images, foreign], ["other-000.tar", "new or empty directory"]),
        ("a file that is a symlink loop", [loop_file, out], ["x.jpg", "symbolic link"]),
    ]


def test_make_shards_bad_inputs_are_one_line(tmp_path):
    for name, args, needles in _bad_inputs(tmp_path):
        proc = mae_scale("make-shards", *args)
        try:
            _one_line_error(proc, *needles)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_make_shards_refuses_another_shard_set_and_walks_symlink_loops_once(tmp_path):
    from data_pipeline import make_sample_folder

    images = make_sample_folder(tmp_path / "images", n_images=8, seed=0, min_side=64, max_side=96)
    cls = next(p for p in (images / "train").iterdir() if p.is_dir())
    (cls / "loop").symlink_to(cls, target_is_directory=True)  # cls/loop/loop/... forever
    (cls / "up").symlink_to(images / "train", target_is_directory=True)
    out = tmp_path / "out"
    made = mae_scale("make-shards", images, out, "--samples-per-shard", 3)
    assert made.returncode == 0, made.stderr
    assert json.loads((out / "manifest.json").read_text())["total"] == 8  # each image once
    again = mae_scale("make-shards", images, out, "--samples-per-shard", 3)  # same plan: kept
    assert again.returncode == 0, again.stderr
    other = mae_scale("make-shards", images, out, "--samples-per-shard", 4)
    _one_line_error(other, "already holds", "different", "new or empty directory")
    assert json.loads((out / "manifest.json").read_text())["samples_per_shard"] == 3  # untouched


def test_bench_data_past_the_bad_sample_threshold_is_one_line(tmp_path):
    from data_pipeline import make_sample_folder, write_shards

    images = make_sample_folder(tmp_path / "images", n_images=16, seed=0, min_side=64, max_side=96)
    m = write_shards(images, tmp_path / "sh", samples_per_shard=8, progress=False)
    (tmp_path / "sh" / m["shards"][0]["name"]).unlink()  # half the data set gone
    proc = mae_scale("bench", "data", tmp_path / "sh", "--workers", 0, "--repeats", 1, "--batch", 4,
                     "--img-size", 32)
    _one_line_error(proc, "8 of ", "missing_shard", "max_bad_fraction",
                    before=[f"skipping shard {tmp_path / 'sh' / m['shards'][0]['name']}"])
