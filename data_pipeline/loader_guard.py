"""A DataLoader worker killed from outside ends the run as one :class:`LoaderWorkerDied` line.

When the kernel's out-of-memory killer picks a loader worker (it sends SIGKILL), PyTorch reports
it in one of two ways, both a bare ``RuntimeError`` whose traceback tells a user nothing to do:

- its SIGCHLD handler raises "DataLoader worker (pid N) is killed by signal: Killed." in the
  main thread, wherever that thread is at the moment (often in the middle of a training step);
- ``next()`` on the loader, after waiting in vain for the dead worker, raises "DataLoader worker
  (pid(s) N) exited unexpectedly".

:func:`guard_workers` iterates a DataLoader turning the second into :class:`LoaderWorkerDied`,
and wraps PyTorch's SIGCHLD handler (once per process, in the main thread) to turn the first into
it too, so the caller's one ``except LoaderWorkerDied`` sees both. The message names the cause
and what to change.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Iterator

from .errors import LoaderWorkerDied

__all__ = ["guard_workers", "ignore_stop_signals", "worker_died"]

_PREFIX = "DataLoader worker"
_wrapped_handler: object = None  # the SIGCHLD handler this module installed, if any


def ignore_stop_signals(worker_id: int) -> None:
    """A worker's `worker_init_fn`: SIGINT / SIGTERM are the main process's to act on. Ctrl-C and
    SLURM signal the whole process group; a worker that died of them would turn the trainer's
    orderly stop (finish the step, save, exit) into a dead-worker error. A worker whose main
    process is gone exits by itself (PyTorch's workers watch their parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_died(torch_message: str, num_workers: int | None = None) -> LoaderWorkerDied:
    """The one-line error for PyTorch's message about a dead worker."""
    what = torch_message.strip().splitlines()[0].rstrip(". ")
    now = f" (now {num_workers})" if num_workers is not None else ""
    return LoaderWorkerDied(
        f"a data loader worker process died ({what}): a worker killed by signal 'Killed' was "
        f"most likely ended by the out-of-memory killer; lower data.num_workers{now} or give "
        "the job more memory ('Bus error': more shared memory, /dev/shm)"
    )


def _wrap_sigchld() -> None:
    """Translate the RuntimeError of PyTorch's SIGCHLD handler into LoaderWorkerDied."""
    global _wrapped_handler
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    current = signal.getsignal(signal.SIGCHLD)
    if current is _wrapped_handler or not callable(current):
        return  # already ours, or PyTorch installed none (nothing to translate)

    def handler(signum, frame, _inner=current):
        try:
            _inner(signum, frame)
        except RuntimeError as e:
            if str(e).startswith(_PREFIX):
                raise worker_died(str(e)) from None
            raise

    signal.signal(signal.SIGCHLD, handler)
    _wrapped_handler = handler


def _dead_worker(it, wait_s: float = 2.0) -> str | None:
    """PyTorch's wording for a worker of `it` that has died (waiting a moment for the kernel to
    report it), or None if all are alive."""
    deadline = time.monotonic() + wait_s
    while True:
        for worker in getattr(it, "_workers", ()):
            if not worker.is_alive():
                code = worker.exitcode
                how = f"is killed by signal: {signal.strsignal(-code)}" if code and code < 0 else f"exited ({code})"
                return f"{_PREFIX} (pid {worker.pid}) {how}"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def guard_workers(loader: Iterable, num_workers: int) -> Iterator:
    """Iterate ``loader`` (a DataLoader with worker processes); a dead worker raises
    :class:`LoaderWorkerDied` instead of PyTorch's RuntimeError."""
    it = iter(loader)  # starts the workers and PyTorch's SIGCHLD handler
    _wrap_sigchld()
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if str(e).startswith(_PREFIX):
                    raise worker_died(str(e), num_workers) from None
                raise
            except (ConnectionError, EOFError) as e:
                # killed while handing a batch's shared memory over: the transfer breaks first
                dead = _dead_worker(it)
                if dead is None:
                    raise
                raise worker_died(dead, num_workers) from e
            yield batch
    finally:
        # Stop the workers now, not when the iterator is collected: a traceback kept by the
        # caller holds it, and until its workers are shut down PyTorch keeps their pids, so any
        # later SIGCHLD of the process would raise the old death again, anywhere.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
