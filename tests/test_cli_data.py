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
