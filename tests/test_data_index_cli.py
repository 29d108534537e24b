"""`mae-scale data index`: our manifest for shards written by others, from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import webdataset as wds
from run_helpers import ROOT


def mae_scale(*args):
    return subprocess.run([sys.executable, "-m", "mae_scale", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_data_index_writes_our_manifest_for_foreign_shards(small_shards, tmp_path):
    from data_pipeline.shard_read import read_shard

    d = tmp_path / "foreign"
    d.mkdir()
    with wds.ShardWriter(str(d / "x-%03d.tar"), maxcount=50, verbose=0) as w:
        for u in sorted(small_shards.glob("*.tar")):
            for _, key, m in read_shard(str(u)):
                w.write({"__key__": key.replace("/", "_"), "jpg": m["jpg"], "cls": m["cls"]})
    made = mae_scale("data", "index", d, "--workers", 2, "--checksums")
    assert made.returncode == 0, made.stderr
    assert "indexed 3 shards, 128 samples" in made.stdout and "tars/s" in made.stderr
    m = json.loads((d / "manifest.json").read_text())
    assert [s["samples"] for s in m["shards"]] == [50, 50, 28] and all(len(s["sha256"]) == 64 for s in m["shards"])
    ok = mae_scale("data", "verify", d)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    again = mae_scale("data", "index", d)  # its own manifest may be rewritten
    assert again.returncode == 0, again.stderr
    for args, words in (((tmp_path / "nothing",), "holds no .tar"), ((small_shards,), "was not written by `data index`"),
                        (("pipe:cat x.tar",), "--out"), ((d, "--workers", 0), "must be a positive whole number")):
        if args[0] == tmp_path / "nothing":
            (tmp_path / "nothing").mkdir()
        bad = mae_scale("data", "index", *args)
        assert bad.returncode == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
