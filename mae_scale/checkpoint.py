"""Checkpoints: save, find the newest complete one, resume, keep the last K. The one place that
knows the layout on disk:

    RUN_DIR/checkpoints/step_00001000/      DeepSpeed's files (model, ZeRO optimizer partitions)
    RUN_DIR/checkpoints/step_00001000/COMPLETE   written last, by rank 0, after every rank saved

A checkpoint without COMPLETE is a save that was cut off (SIGKILL, node loss) and is never taken
as the newest: it is deleted when the run resumes. Old checkpoints lose their marker before their
files, so a kill while pruning never leaves a half-deleted checkpoint that looks complete.

Loading never executes code from the files: DeepSpeed's own loader uses `weights_only=False`, so
the engine's checkpoint engine is replaced by one that loads with `weights_only=True` and allows
only the plain DeepSpeed value types its checkpoints hold.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mae_scale.distributed import barrier
from mae_scale.faults import kill_if_armed

MARKER = "COMPLETE"
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    found = []
    if ckpt_root.is_dir():
        for child in ckpt_root.iterdir():
            if child.name.startswith(TAG_PREFIX) and (child / MARKER).is_file():
                found.append((int(child.name[len(TAG_PREFIX):]), child))
    return sorted(found)


def latest_checkpoint(run_or_ckpt_root: Path) -> Optional[Path]:
    """The newest complete checkpoint directory under a run directory (or its checkpoints/)."""
    root = Path(run_or_ckpt_root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def read_marker(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / MARKER).read_text())


def _safe_globals() -> list:
    """The non-tensor types DeepSpeed puts in its checkpoints; each is plain data, not code."""
    allowed = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    import collections
    allowed += [collections.OrderedDict, set, torch.Size]
    return allowed


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load that refuses to run code: weights_only=True with DeepSpeed's value types allowed."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def install_safe_loader(engine) -> None:
    """Make the DeepSpeed engine load its checkpoints with `safe_torch_load`."""
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    checkpoint_engine.load = load


class CheckpointManager:
    """Saves and restores a DeepSpeed engine plus the trainer's own state (step, epoch, data
    position, MLflow run id) under RUN_DIR/checkpoints."""

    def __init__(self, run_dir: Path, keep_last: int, is_main: bool):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.is_main = is_main

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.root)

    def remove_incomplete(self) -> None:
        """Delete checkpoint folders whose save was cut off (rank 0; all ranks wait)."""
        if self.is_main and self.root.is_dir():
            for child in self.root.iterdir():
                if child.is_dir() and child.name.startswith(TAG_PREFIX) and not (child / MARKER).is_file():
                    shutil.rmtree(child, ignore_errors=True)
        barrier()

    def save(self, engine, step: int, client_state: dict, world_size: int) -> Path:
        tag = tag_for(step)
        path = self.root / tag
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a cut-off earlier save of this very step
                shutil.rmtree(path)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        barrier()
        kill_if_armed("save", step)  # tests: a kill after the files, before the marker
        if self.is_main:
            marker = {"step": step, "world_size": world_size, "time": time.time(),
                      "epoch": client_state.get("epoch"), "zero_stage": engine.zero_optimization_stage()}
            _fsync_write(path / MARKER, json.dumps(marker))
            self._prune()
        barrier()
        return path

    def _prune(self) -> None:
        found = complete_checkpoints(self.root)
        for _, old in found[: max(len(found) - self.keep_last, 0)]:
            (old / MARKER).unlink()  # first: a kill from here on leaves an incomplete folder, not a bad one
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, ckpt_dir: Path) -> dict:
        """Restore engine state from a complete checkpoint; returns the trainer's client state."""
        marker = read_marker(ckpt_dir)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if marker["world_size"] != world and marker.get("zero_stage", 0) > 0:
            # ZeRO partitions are per rank: go through DeepSpeed's world-size-free universal format.
            from mae_scale.reshard import load_universal, universal_checkpoint

            if self.is_main:
                print(f"resharding {ckpt_dir.name}: world size {marker['world_size']} -> {world} "
                      "(DeepSpeed universal checkpoint)", flush=True)
            return load_universal(engine, universal_checkpoint(ckpt_dir))
        load_path, client_state = engine.load_checkpoint(
            str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
        return client_state or {}
