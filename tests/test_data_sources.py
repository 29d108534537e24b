"""Foreign shards and mixes from the config: data.train_shards as a list of
weighted sources, data.image_key / data.label_key, remote shards without an index."""

from __future__ import annotations

import pytest
from run_helpers import ROOT

from data_pipeline.keys import parse_keys
from mae_scale.config import ConfigError, load_config
from mae_scale.config_resume import resume_class

SMOKE = ROOT / "configs" / "pretrain" / "mae_vit_tiny_smoke.yaml"


def _load(overrides):
    return load_config(SMOKE, [f"output_dir={ROOT / 'runs' / '_never_made'}", *overrides], scope="plan")


def test_train_shards_takes_a_list_of_weighted_sources(small_shards, tmp_path):
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'run'}",
                              f"data.train_shards=[{{shards: {small_shards}, weight: 2}}, "
                              f"{{shards: {small_shards}/manifest.json, weight: 0.5, name: extra}}]",
                              "data.epoch_samples=64"])
    assert cfg.data.train_shards[1] == {"shards": f"{small_shards}/manifest.json", "weight": 0.5, "name": "extra"}
    for bad, words in (("[{shards: X, weight: 0}]", "must be a positive finite number"),
                       ("[{shards: X, weight: .nan}]", "must be a positive finite number"),
                       ("[{shards: X, weight: 1}, {shards: /nowhere, weight: 1}]", "does not exist"),
                       ("[{shards: X}, {shards: X, wieght: 1}]", "must be {shards: PATH, weight: W}"),
                       ("[]", "names no source")):
        with pytest.raises(ConfigError) as e:
            load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", f"data.train_shards={bad.replace('X', str(small_shards))}"])
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not combine with data.resampled"):
        load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", "data.resampled=true",
                            f"data.train_shards=[{{shards: {small_shards}, weight: 1}}]"])


def test_remote_shards_without_an_index_are_refused_before_any_work(small_shards, tmp_path):
    url = f"pipe:cat {small_shards}/train-{{000000..000003}}.tar"
    with pytest.raises(ConfigError, match="mae-scale data index") as e:
        load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", f"data.train_shards={url}"])
    assert "\n" not in str(e.value)
    load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", f"data.train_shards={url}", "data.resampled=true",
                        "data.epoch_samples=64", "train.global_batch_size=64"])
    from braceexpand import braceexpand

    from data_pipeline.index import index_shards

    index_shards(list(braceexpand(url)), tmp_path / "remote.json", progress=False)  # what `data index` writes
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", f"data.train_shards={tmp_path / 'remote.json'}"])
    assert cfg.data.train_shards.endswith("remote.json")


def test_sample_keys_are_checked_and_classified():
    assert _load(["data.image_key=input.jpg;png", "data.label_key=json:label"]).data.label_key == "json:label"
    for bad in ("data.label_key=json:", "data.image_key=;", "data.label_key=jpg"):
        with pytest.raises(ConfigError, match="data."):
            _load([bad])
    assert resume_class("data.image_key") == resume_class("data.label_key") == "accept"
    assert resume_class("data.train_shards") == "accept"


def test_keys_pick_the_first_configured_image_and_read_labels():
    from data_pipeline import BadImage

    keys = parse_keys("webp;jpg", "json:meta.label")
    members = {"jpg": b"J", "webp": b"W", "json": b'{"meta": {"label": 4}}'}
    assert keys.image(members) == b"W" and keys.label(members) == 4
    assert keys.label({"json": b'{"meta": {"label": -1}}'}) == -1
    assert keys.label({"json": b'{"meta": {}}'}) == -1 and keys.label({}) == -1
    with pytest.raises(BadImage, match="not an integer"):
        keys.label({"json": b'{"meta": {"label": "cat"}}'})
    assert parse_keys().label({"cls": b"-3"}) == -1 and parse_keys().label({"cls": b" 7\n"}) == 7


def test_pretraining_on_a_mix_logs_each_source_share(small_shards, tmp_path):
    """A real run over two weighted sources: the epoch has data.epoch_samples samples, each source
    exactly its weight's share of them, and the share is in metrics.jsonl."""
    import json

    from run_helpers import base_overrides, run_pretrain

    a, b = f"'{small_shards}/train-{{000000..000001}}.tar'", f"'{small_shards}/train-{{000002..000003}}.tar'"
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **{
        "data.train_shards": f"[{{shards: {a}, weight: 1, name: few}}, {{shards: {b}, weight: 3, name: many}}]",
        "data.epoch_samples": 64, "train.epochs": 1, "checkpoint.every_steps": 100}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 64 samples / 16 per step
    assert rows[-1]["source_share_few"] == 0.25 and rows[-1]["source_share_many"] == 0.75
    assert all(abs(r["source_share_few"] + r["source_share_many"] - 1) < 1e-9 for r in rows)
