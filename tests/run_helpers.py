"""Starting real pretraining processes in tests (plain python for world size 1, torchrun for 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/pretrain/mae_vit_tiny_smoke.yaml"


def base_overrides(shards: Path, out: Path, **extra) -> list[str]:
    """A tiny, fast run: 64 px crops, global batch 16, checkpoints every 2 steps, no MLflow."""
    values = {
        "output_dir": out, "data.train_shards": shards, "data.input_size": 64, "data.num_workers": 0,
        "train.global_batch_size": 16, "train.micro_batch_size": 8, "train.epochs": 4,
        "train.warmup_epochs": 1, "train.log_every_steps": 1, "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 2, "tracking.enabled": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def pretrain_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    args = ["pretrain", "--config", str(SMOKE), *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "mae_scale", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mae_scale", *args]


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # bitwise results depend on the thread count
    env.setdefault("MAE_SCALE_TRACEBACK", "1")  # an unexpected crash prints its traceback into the test's log
    env.pop("MAE_SCALE_FAULT", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_pretrain(overrides: list[str], nproc: int = 1, check: bool = True, timeout: int = 600,
                 **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(pretrain_cmd(overrides, nproc), capture_output=True, text=True,
                          timeout=timeout, env=run_env(**env), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
