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

Damage (`integrity.py`): the marker records every file's size and CRC-32, and
`resume` checks them before DeepSpeed reads a byte. A checkpoint that fails its check, or fails to
load, is renamed to `damaged_step_...` (never deleted; the scanners ignore it) and the previous
complete one is tried; only when none loads does the run stop, in one line. A save that fails
(full disk, I/O error) on any rank removes its partial folder, leaves the previous checkpoint as
the newest, and raises `CheckpointSaveError` on every rank: the run stops (a retry at the next
cadence would keep training on steps no checkpoint can hold, and a full disk rarely frees itself).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from mae_scale.checkpoint.integrity import (CHECKSUM, SaveRecord, all_gather, check_collective, describe_error,
                                            install_save_hook, manifest)
from mae_scale.errors import RunStopped
from mae_scale.distributed import any_rank, barrier, broadcast_object
from mae_scale.faults import enospc_if_armed, kill_if_armed

MARKER = "COMPLETE"
TAG_PREFIX = "step_"
DAMAGED_PREFIX = "damaged_"  # a checkpoint moved aside: not step_*, so no scanner takes or deletes it


class CheckpointError(RunStopped):
    """No checkpoint of the run can be loaded (one line; the run must not restart from step 0)."""


class CheckpointSaveError(RunStopped):
    """A checkpoint could not be written (one line); the previous complete one is intact."""


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
        """Write a checkpoint of `step` (every rank). On any rank's failure to write it, every rank
        raises CheckpointSaveError after rank 0 has removed the partial folder."""
        tag = tag_for(step)
        path = self.root / tag
        error = None
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if path.exists():  # a cut-off earlier save of this very step
                    shutil.rmtree(path)
                path.mkdir()  # here, where a failure is caught on rank 0 before any collective
            except OSError as exc:
                error = describe_error(exc)
        if any_rank(error is not None):  # also the barrier before the save
            self._fail_save(path, step, broadcast_object(error))
        install_save_hook(engine)
        engine._mae_save_record = record = SaveRecord(step)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        except Exception as exc:
            # DeepSpeed's own writes: its last one (rank 0 copying zero_to_fp32.py) comes after every
            # collective but the closing barrier, which this rank now stands in for. The files
            # themselves never raise here: the hook turns their errors into record.error.
            record.error = record.error or describe_error(exc)
            barrier()
        finally:
            engine._mae_save_record = None
        records = all_gather((record.error, record.files))  # every rank's verdict and hashes
        failed = [e for e, _ in records if e is not None]
        if failed:
            self._fail_save(path, step, failed[0])
        kill_if_armed("save", step)  # tests: a kill after the files, before the marker
        error = None
        if self.is_main:
            marker = {"step": step, "world_size": world_size, "time": time.time(),
                      "epoch": client_state.get("epoch"), "zero_stage": engine.zero_optimization_stage(),
                      "checksum": CHECKSUM}
            try:
                marker["files"] = manifest(path, [files for _, files in records])
                enospc_if_armed("marker_enospc", step, str(path / MARKER))
                _fsync_write(path / MARKER, json.dumps(marker))
            except OSError as exc:
                error = describe_error(exc)
        if any_rank(error is not None):
            self._fail_save(path, step, broadcast_object(error))
        if self.is_main:
            self._prune()
        barrier()
        return path

    def _fail_save(self, path: Path, step: int, reason: str) -> None:
        """Every rank: remove the partial checkpoint (rank 0), then raise one line saying what to do."""
        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)  # marker (and its .tmp) included: never half-complete
        barrier()
        previous = complete_checkpoints(self.root)
        resume = (f"run the same command to resume from step {previous[-1][0]}" if previous
                  else "run the same command to start again (no earlier checkpoint exists)")
        raise CheckpointSaveError(f"could not write checkpoint {path.name} ({reason}): free space on "
                                  f"{self.root.resolve()} (or fix the disk), then {resume}")

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
            from mae_scale.checkpoint.reshard import load_universal, universal_checkpoint

            if self.is_main:
                print(f"resharding {ckpt_dir.name}: world size {marker['world_size']} -> {world} "
                      "(DeepSpeed universal checkpoint)", flush=True)
            return load_universal(engine, universal_checkpoint(ckpt_dir))
        load_path, client_state = engine.load_checkpoint(
            str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
        return client_state or {}

    def resume(self, engine) -> Optional[tuple[Path, dict]]:
        """Load the newest complete checkpoint that passes its check and loads; returns (its folder,
        the client state), or None when the run has no checkpoint at all. A collective.

        Checksums are checked before DeepSpeed reads the files, so damaged bytes are never loaded.
        A checkpoint that fails (on any rank) is moved aside to `damaged_step_...` and the previous
        one is tried; loading it overwrites whatever a half-done load left in the engine (module
        weights and optimizer state are loaded wholesale). No loadable checkpoint while checkpoints
        exist raises CheckpointError (never a silent restart from step 0)."""
        listed = [d.name for _, d in complete_checkpoints(self.root)] if self.is_main else None
        candidates = [self.root / name for name in reversed(broadcast_object(listed))]  # rank 0's view, newest first
        tried = []
        for ckpt_dir in candidates:
            problems = check_collective(ckpt_dir)
            if not problems:
                state, error = None, None
                try:
                    state = self.load(engine, ckpt_dir)
                except pickle.UnpicklingError:  # torch's own message is a page long
                    error = ("it holds objects a weights_only load refuses (pickled code, or types DeepSpeed "
                             "checkpoints never hold)")
                except Exception as exc:  # truncated zip, DeepSpeed shape errors ...
                    error = f"it could not be loaded ({describe_error(exc)})"
                errors = [e for e in all_gather(error) if e is not None]
                if not errors:
                    return ckpt_dir, state
                problems = errors[:1]
            reason = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            moved = self._move_aside(ckpt_dir, reason)
            if self.is_main:
                print(f"checkpoint {ckpt_dir.name} is damaged: {reason}; moved it to {moved}, "
                      "trying the one before it", flush=True)
            tried.append(f"{ckpt_dir.name}: {reason}")
        damaged = sorted(p.name for p in self.root.glob(DAMAGED_PREFIX + "*")) if self.root.is_dir() else []
        if tried:
            raise CheckpointError(f"no checkpoint in {self.root} could be loaded ({'; '.join(tried)}); all were moved "
                                  f"to {DAMAGED_PREFIX}step_* and nothing was deleted: restore an intact copy as "
                                  "checkpoints/step_*, or move them away to start from step 0")
        if damaged:
            raise CheckpointError(f"{self.root} holds only checkpoints moved aside as damaged ({', '.join(damaged)}); "
                                  "restore an intact copy as checkpoints/step_*, or move them away to start from step 0")
        return None

    def _move_aside(self, ckpt_dir: Path, reason: str) -> str:
        """Rank 0 renames a damaged checkpoint to damaged_step_* (with the reason inside); all wait.
        Returns the new name (or why it could not be moved: it is then checked again next start)."""
        moved = None
        if self.is_main:
            target = ckpt_dir.with_name(DAMAGED_PREFIX + ckpt_dir.name)
            n = 1
            while target.exists():  # damaged twice at the same step (after a later rerun)
                n += 1
                target = ckpt_dir.with_name(f"{DAMAGED_PREFIX}{ckpt_dir.name}.{n}")
            try:
                os.replace(ckpt_dir, target)
                moved = f"checkpoints/{target.name}"
                (target / "DAMAGED.txt").write_text(reason + "\n")
            except OSError as exc:
                moved = moved or f"nowhere ({describe_error(exc)})"
        moved = broadcast_object(moved)
        barrier()
        return moved
