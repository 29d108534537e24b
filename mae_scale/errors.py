"""How a command ends when a user can act on it, and the exit status that gets; decided here only.

- `UserError`: bad input (a config, a path, a weights file, a run directory another process holds,
  a config change a resume cannot take). One line, exit status 2, before any work starts.
- `RunStopped`: a run that cannot go on (non-finite numbers, too many bad samples, a save that
  failed, no loadable checkpoint, a dead loader worker). One line, exit status 1; the newest
  checkpoint is untouched, so the same command resumes once the cause is fixed.
- `RunInterrupted`: a `RunStopped` by SIGTERM / SIGINT, exit status 128 + the signal's number.

Every user-facing error derives from one of these. The data pipeline stands alone (it imports
nothing from `mae_scale`), so its errors are classed here by name, in `FOREIGN`. Anything else is a
crash: `mae_scale.cli` prints one line naming the file that holds its traceback, status 1.

This module imports nothing from the project: every layer may raise these.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""

    exit_code = 2


class RunStopped(Exception):
    """A run that cannot go on: printed as one line, exit status 1. `announce` is False where
    another rank prints the same line (a signal every rank received)."""

    exit_code = 1
    announce = True


class RunInterrupted(RunStopped):
    """The run stopped on a signal (one line); `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int, announce: bool = True):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.announce = announce


# The data pipeline's own errors (data_pipeline.errors), by module and class name.
FOREIGN = {
    "data_pipeline.errors.DataInputError": UserError,
    "data_pipeline.errors.TooManyBadSamples": RunStopped,
    "data_pipeline.errors.LoaderWorkerDied": RunStopped,
}


def kind_of(exc: BaseException) -> Optional[type]:
    """UserError, RunStopped, or None for a failure nothing anticipated (a crash)."""
    for cls in type(exc).__mro__:
        if cls in (UserError, RunStopped):
            return cls
        foreign = FOREIGN.get(f"{cls.__module__}.{cls.__qualname__}")
        if foreign is not None:
            return foreign
    return None


def exit_code(exc: BaseException) -> Optional[int]:
    """The status a command ends with for `exc`, or None for a crash."""
    kind = kind_of(exc)
    if kind is None:
        return None
    return getattr(exc, "exit_code", kind.exit_code) if isinstance(exc, kind) else kind.exit_code


def one_line(exc: BaseException) -> str:
    """The first line of an error's message: what the user reads."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def report(exc: BaseException) -> Optional[int]:
    """Print an anticipated error as its one line (`error: ...`, on stderr) and return its exit
    status; None (nothing printed) for a crash, which the caller reports with its traceback."""
    import sys

    code = exit_code(exc)
    if code is not None and getattr(exc, "announce", True):
        # our own messages are one line by contract; the data pipeline's may carry detail lines
        text = str(exc) if isinstance(exc, (UserError, RunStopped)) else one_line(exc)
        print(f"error: {text}", file=sys.stderr, flush=True)
    return code
