"""Fault injection for tests of "never losing a run": `MAE_SCALE_FAULT=point:step` makes the process
fail at a named point of a given optimizer step, so tests can prove recovery from the worst moment
(a SIGKILL in the middle of a checkpoint save, a loss that turns NaN). Unset in normal runs.
"""

from __future__ import annotations

import os
import signal


def armed(point: str, step: int) -> bool:
    return os.environ.get("MAE_SCALE_FAULT", "") == f"{point}:{step}"


def kill_if_armed(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
