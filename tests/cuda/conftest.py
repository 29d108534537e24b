"""Pretraining runs shared by the tests under tests/cuda: the smoke preset's tiny MAE at 64 px on one
device, bf16, ZeRO-1, -2 and -3, each run straight and run killed + resumed (see test_gpu_resume.py)."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cuda_support import FAULT, ON_GPU, STAGES, STEPS
from mae_scale.checkpoint import MARKER
from run_helpers import base_overrides, run_pretrain


def _overrides(shards: Path, out: Path, zero: int, **extra) -> list[str]:
    return base_overrides(shards, out, **{"train.max_steps": STEPS, "train.zero_stage": zero,
                                          "train.precision": "bf16", **extra})


@pytest.fixture(scope="session")
def gpu_runs(small_shards, tmp_path_factory) -> dict[int, dict]:
    """zero stage -> {"straight", "resumed": run dirs, "procs": {"straight", "killed", "resumed"},
    "partial_save_left": the killed run left step 4's files without their COMPLETE marker}.

    The straight and killed runs of all stages start together (on a GPU: the tiny model leaves the
    device mostly idle, and the GPU lease is short); the resumes follow. A failed run is not raised
    here: each stage's test reports its own."""
    root = tmp_path_factory.mktemp("gpu_runs")
    runs = {z: {"straight": root / f"zero{z}_straight", "resumed": root / f"zero{z}_resumed", "procs": {}}
            for z in STAGES}

    def start(z: int, kind: str) -> subprocess.CompletedProcess:
        r = runs[z]
        if kind == "straight":  # keeps every checkpoint: step 2 is the reference point of the tolerance
            return run_pretrain(_overrides(small_shards, r["straight"], z, **{"checkpoint.keep_last": 8}),
                                check=False)
        env = {"MAE_SCALE_FAULT": FAULT} if kind == "killed" else {}
        return run_pretrain(_overrides(small_shards, r["resumed"], z), check=False, **env)

    workers = 6 if ON_GPU else 2  # two CPU cores in CI-like rehearsals: more would only thrash
    with ThreadPoolExecutor(workers) as pool:
        first = {(z, k): pool.submit(start, z, k) for z in STAGES for k in ("straight", "killed")}
        for (z, k), fut in first.items():
            runs[z]["procs"][k] = fut.result()
        for z in STAGES:  # before the resume, which deletes it: the killed save left files, no marker
            step4 = runs[z]["resumed"] / "checkpoints" / "step_00000004"
            runs[z]["partial_save_left"] = step4.is_dir() and not (step4 / MARKER).exists()
        second = {z: pool.submit(start, z, "resumed") for z in STAGES}
        for z, fut in second.items():
            runs[z]["procs"]["resumed"] = fut.result()
    return runs
