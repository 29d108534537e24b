"""The data pipeline's errors that a command line prints as one line (no traceback).

- :class:`TooManyBadSamples`: the share of bad samples passed ``max_bad_fraction``; the message
  keeps the counts by kind and the fraction.
- :class:`LoaderWorkerDied`: a DataLoader worker process was killed from outside (the kernel's
  out-of-memory killer sends SIGKILL) or crashed; the message names the cause and what to change.
- :class:`DataInputError`: bad input to a data verb (an empty source folder, two files with one
  sample key, a file list naming a missing file, an output directory holding other shards, a
  shard set none of whose shards can be read). A ``ValueError``, so callers that caught the
  plain ``ValueError`` these raised before keep working.
"""

from __future__ import annotations

__all__ = ["TooManyBadSamples", "LoaderWorkerDied", "DataInputError"]


class TooManyBadSamples(RuntimeError):
    """The share of bad samples passed ``max_bad_fraction``."""


class LoaderWorkerDied(RuntimeError):
    """A data loader worker process died (killed by a signal, e.g. the OOM killer's SIGKILL)."""


class DataInputError(ValueError):
    """Input a data verb cannot work with; the message says what to do instead."""
