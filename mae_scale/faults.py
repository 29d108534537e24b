"""Fault injection for tests of "never losing a run": `MAE_SCALE_FAULT=point:step` makes the process
fail at a named point of a given optimizer step, so tests can prove recovery from the worst moment
(a SIGKILL in the middle of a checkpoint save, a loss that turns NaN, a full disk). Unset in normal
runs. `MAE_SCALE_FAULT_RANK=r` limits the fault to the process whose RANK is r (one rank's disk
fills up while the others' writes succeed).

Points: `save` (SIGKILL after the checkpoint files, before the marker), `nan_loss` (that step's
loss is NaN), `enospc` (the checkpoint engine's write of that step's files fails with ENOSPC, after
leaving a partial file), `marker_enospc` (writing that step's COMPLETE marker fails with ENOSPC).
"""

from __future__ import annotations

import errno
import os
import signal


def armed(point: str, step: int) -> bool:
    if os.environ.get("MAE_SCALE_FAULT", "") != f"{point}:{step}":
        return False
    only = os.environ.get("MAE_SCALE_FAULT_RANK")
    return only is None or only == os.environ.get("RANK", "0")


def kill_if_armed(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def enospc_if_armed(point: str, step: int, path: str = "") -> None:
    """Raise what a full disk raises (OSError ENOSPC) if `point:step` is armed."""
    if armed(point, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
