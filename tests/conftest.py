"""Shared fixtures: small WebDataset shards made from real packaged photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in every in-process test (subprocess runs get OMP_NUM_THREADS=1): on a
    busy shared CPU, OpenMP threads spinning against other jobs made a 3-step tiny run take 20 s
    instead of 0.1 s, and bitwise comparisons depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def private_index_cache(tmp_path_factory):
    """Header counts of foreign shards (data_pipeline.index) go to a cache of this session, not
    ~/.cache (subprocess runs inherit it)."""
    import os

    before = os.environ.get("MAE_SCALE_INDEX_CACHE")
    os.environ["MAE_SCALE_INDEX_CACHE"] = str(tmp_path_factory.mktemp("index-cache"))
    yield
    if before is None:
        os.environ.pop("MAE_SCALE_INDEX_CACHE", None)
    else:
        os.environ["MAE_SCALE_INDEX_CACHE"] = before


@pytest.fixture(scope="session")
def world_of_one():
    """A gloo group of one in this test process, started once for the whole session: DeepSpeed keeps
    its groups across a destroy_process_group, so a second group in one process breaks the next
    `deepspeed.initialize`. The variables the group was started from are taken back at once, LOCAL_RANK
    aside (DeepSpeed asks for it): a RANK or MASTER_PORT left in os.environ would be inherited by the
    subprocesses of later tests, whose rendezvous then finds the port taken."""
    import os

    from mae_scale.distributed import init_distributed, prepare_env

    saved = dict(os.environ)
    prepare_env()
    init_distributed()
    os.environ.clear()
    os.environ.update(saved)
    os.environ.setdefault("LOCAL_RANK", "0")
    yield
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """128 real photos (crops of skimage / sklearn images) in 4 labelled shards."""
    from data_pipeline import make_sample_folder, write_shards

    root = tmp_path_factory.mktemp("small_shards")
    make_sample_folder(root / "images", n_images=128, seed=0)
    write_shards(root / "images", root / "shards", samples_per_shard=32, seed=0, progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """Real labelled data: scikit-learn's digits as shards, 1500 train / 297 val (train/ and val/)."""
    from data_pipeline import write_fashion_mnist_shards
    from digits_data import write_digits_idx

    root = tmp_path_factory.mktemp("digits")
    (root / "idx").mkdir()
    write_digits_idx(root / "idx", 1500, 297)
    write_fashion_mnist_shards(root / "shards", src_dir=root / "idx", samples_per_shard=400, progress=False)
    return root / "shards"
