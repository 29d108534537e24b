"""Shared fixtures: small WebDataset shards made from real packaged photos."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """128 real photos (crops of skimage / sklearn images) in 4 labelled shards."""
    from data_pipeline import make_sample_folder, write_shards

    root = tmp_path_factory.mktemp("small_shards")
    make_sample_folder(root / "images", n_images=128, seed=0)
    write_shards(root / "images", root / "shards", samples_per_shard=32, seed=0, progress=False)
    return root / "shards"
