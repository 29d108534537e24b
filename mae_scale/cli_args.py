"""Argument checks shared by every verb's parser, so bad input is refused where it is parsed, in
one line, before any work starts.

* `OneLineParser`: argparse's own errors (an unknown flag, a missing argument, a value a `type=`
  rejects) as one `error: ...` line and status 2, instead of the usage block plus the error.
* `positive_int`, `non_negative_int`, `positive_float`: `type=` helpers for numeric flags.
* `check_output_file`: an output file's name and folder, checked before the work that fills it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """Subparsers are made with the parent's class, so setting it on the top parser covers every verb."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (`{self.prog} --help` lists the options)", file=sys.stderr, flush=True)
        sys.exit(2)


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    return value


def positive_int(text: str) -> int:
    """1, 2, ...: counts and sizes where 0 would mean nothing to do, or a division by zero later."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive whole number (1 or more)")
    return value


def non_negative_int(text: str) -> int:
    """0, 1, ...: e.g. loader workers (0 = in the main process) or warmup steps."""
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (float() also takes 'nan' and 'inf', which compare as valid)."""
    value = _number(text, float, "a number")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def check_output_file(path: str | os.PathLike, suffix: str, flag: str = "--out") -> Path:
    """Refuse, in one line, an output file the verb could not write once its work is done: a wrong
    suffix, a directory, a folder under a file, a folder that cannot be written. Missing folders
    are fine (the verb creates them when it writes), but only where they could be created.
    Nothing is created here: writability is tried with a temporary file that is removed at once."""
    from mae_scale.errors import UserError

    out = Path(path)
    if out.suffix != suffix:
        raise UserError(f"{flag} {out}: the output must be a {suffix} file")
    if out.is_dir():
        raise UserError(f"{flag} {out} is a directory; name a file, e.g. {out / ('weights' + suffix)}")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {out}: {existing} is a file, not a folder; pick another path")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".mae-scale-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot write in {existing} ({exc.strerror or exc}); pick a writable "
                        "folder") from None
    return out
