"""SIGTERM and SIGINT end a run at a step boundary, with a checkpoint where one fits in time.

What sends them: SLURM at a time limit or `scancel` (SIGTERM to every task, SIGKILL `KillWait`
seconds later, 30 by default), Ctrl-C (SIGINT to the whole process group), a torchrun that is
itself stopped (it forwards the signal to its workers). The first signal only raises a flag: the
step under way finishes, the ranks agree on stopping through the step's own all-reduce (so all of
them stop after the same step), a checkpoint is saved if the last save took no longer than the
grace period, and the run ends with one line and status 128 + the signal's number
(`mae_scale.errors.RunInterrupted`, raised by the loop). A second
signal ends the process at once: a save cut off there is an incomplete checkpoint, which the next
start deletes, so nothing complete is ever damaged.

Under submitit the job's own handlers stay in charge (it requeues on SIGUSR2 and lets SIGTERM
pass): handlers are installed only where nobody else has installed one.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Installs the handlers for the life of a training loop; `requested` is the first signal seen."""

    def __init__(self) -> None:
        self.requested: Optional[int] = None
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None:  # the second one: leave now, whatever is under way
            print(f"error: {signal.Signals(signum).name} again: stopping at once (an unfinished checkpoint "
                  "is deleted at the next start)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = signum
        print(f"{signal.Signals(signum).name} received: stopping after this step (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def install(self) -> "StopSignals":
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            # SIGINT's default is Python's KeyboardInterrupt handler; anything else is someone's own
            if current in (signal.SIG_DFL, signal.default_int_handler):
                self.previous[signum] = current
                signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()
