"""Fixtures for data_pipeline tests: a small real-photo folder and its shards, made once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("data_pipeline") is None:  # running from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_pipeline import make_sample_folder, write_shards  # noqa: E402

N_IMAGES = 48
PER_SHARD = 8


@pytest.fixture(scope="session")
def sizes() -> dict[str, int]:
    """Size of the shared data set (test modules can't import conftest: no packages here)."""
    return {"n_images": N_IMAGES, "per_shard": PER_SHARD}


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # smaller than ImageNet sizes to keep decoding cheap; still real JPEG photos
    return make_sample_folder(tmp_path_factory.mktemp("samples"), n_images=N_IMAGES, seed=0,
                              min_side=160, max_side=240)


@pytest.fixture(scope="session")
def shard_dir(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(sample_dir, out, samples_per_shard=PER_SHARD, seed=0, progress=False)
    return out
