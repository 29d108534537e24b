"""Changing the world size on resume: DeepSpeed universal checkpoints.

A ZeRO checkpoint (stage >= 1) stores the optimizer state (fp32 master weights, Adam moments)
partitioned over the data-parallel ranks that wrote it, so a run at another world size cannot
load it directly (DeepSpeed: "The checkpoint being loaded used a DP world size of 2 but the
current world size is 1"). DeepSpeed's universal checkpoint is the same state with every
parameter's fragments merged back into one file per parameter and state key, which any world
size can re-partition on load.

    RUN_DIR/checkpoints/step_00000008/             the ZeRO checkpoint + COMPLETE marker
    RUN_DIR/checkpoints/step_00000008_universal/   its universal form (written by `universal_checkpoint`)

`universal_checkpoint` converts once (rank 0; every rank waits), in a staging folder that is
renamed into place only when the conversion finished, so a kill mid-conversion never leaves a
half-written universal folder that looks usable. A finished one is reused. The universal folder
has no COMPLETE marker on purpose: it is never taken as a resume point by itself, and
`CheckpointManager.remove_incomplete` deletes it at the next start (by then the resumed run has
written checkpoints at its own world size).

`load_universal` makes an already-built engine load it: DeepSpeed decides by its config flag
`checkpoint.load_universal`, read through `engine.load_universal_checkpoint()` at load time only,
so the flag is switched on for the one `load_checkpoint` call and off again (later loads of
ordinary checkpoints by the same engine stay ordinary).

Measured here (CPU, gloo, client torch.optim.AdamW): ZeRO-1 and ZeRO-2 at world 2 -> 1 give back
the fp32 master weights and Adam moments bitwise (tests/test_reshard.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mae_scale.distributed import barrier, broadcast_object

UNIVERSAL_SUFFIX = "_universal"
DONE = "UNIVERSAL_DONE"  # written last into the staging folder, before the rename
STAGING = ".universal_staging"  # not starting with step_: the checkpoint scanners ignore it


def universal_dir_for(ckpt_dir: Path) -> Path:
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.with_name(ckpt_dir.name + UNIVERSAL_SUFFIX)


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def convert(ckpt_dir: Path, timeout: float = 3600) -> Path:
    """Convert (this process only, no barrier) a complete ZeRO checkpoint to its universal form;
    returns the universal folder. Idempotent: an existing finished conversion is returned as is."""
    ckpt_dir = Path(ckpt_dir)
    out = universal_dir_for(ckpt_dir)
    if (out / DONE).is_file():
        return out
    marker_path = ckpt_dir / "COMPLETE"
    if not marker_path.is_file():
        raise RuntimeError(f"{ckpt_dir} is not a complete checkpoint (no COMPLETE marker); refusing to convert it")
    marker = json.loads(marker_path.read_text())
    if int(marker.get("zero_stage", 0)) == 0:
        raise RuntimeError(f"{ckpt_dir} is a ZeRO-0 checkpoint: nothing is partitioned, load it directly")
    staging_root = ckpt_dir.parent / STAGING
    shutil.rmtree(staging_root, ignore_errors=True)  # a conversion cut off earlier
    staging = staging_root / out.name
    staging_root.mkdir(parents=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir),
           "--output_folder", str(staging), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    # Checkpoints from a plain (non-Megatron) model lack the `universal_checkpoint_info` DeepSpeed
    # asks for at ZeRO-1/2; it only carries a version number for plain models, so inject it.
    if int(marker["zero_stage"]) <= 2:
        cmd.append("--inject_missing_state")
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else env.get("DS_ACCELERATOR", "cuda"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        shutil.rmtree(staging_root, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"converting {ckpt_dir} to a universal checkpoint failed: " + " | ".join(tail))
    (staging / "latest_universal").unlink(missing_ok=True)
    (staging / DONE).write_text(json.dumps({"source": ckpt_dir.name, **marker}))
    if out.exists():  # an unfinished earlier rename target (no DONE): replace it
        shutil.rmtree(out)
    os.replace(staging, out)
    shutil.rmtree(staging_root, ignore_errors=True)
    return out


def universal_checkpoint(ckpt_dir: Path) -> Path:
    """The universal form of `ckpt_dir`, made by rank 0 if missing; every rank waits for it.
    Collective when a process group is up: call it on every rank."""
    ckpt_dir = Path(ckpt_dir)
    error = None
    if _is_main():
        try:
            convert(ckpt_dir)
        except Exception as exc:  # the other ranks must not hang in the barrier
            error = f"{type(exc).__name__}: {exc}"
    error = broadcast_object(error)
    barrier()
    if error:
        raise RuntimeError(error)
    return universal_dir_for(ckpt_dir)


def load_universal(engine, universal_dir: Path) -> dict:
    """Load a universal checkpoint into an initialized DeepSpeed engine at any world size; returns
    the client state saved with the original checkpoint (step, epoch, data position, run ids)."""
    universal_dir = Path(universal_dir)
    if not (universal_dir / DONE).is_file():
        raise RuntimeError(f"{universal_dir} is not a finished universal checkpoint")
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, client_state = engine.load_checkpoint(
            str(universal_dir.parent), tag=universal_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load universal checkpoint {universal_dir}")
    return client_state or {}
