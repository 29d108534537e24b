"""One writer per run directory: `RUN_DIR/.lock`, held by rank 0 for the life of the run.

Two runs writing one run directory (a second `mae-scale pretrain` on the same `output_dir`, a job
submitted twice) would interleave checkpoints, prune each other's and truncate each other's
metrics. So rank 0 takes an exclusive `flock` on `RUN_DIR/.lock` before writing anything and keeps
it until the process ends; a second process is refused in one line naming the holder (host, pid,
SLURM job, start time), read from the JSON record the holder wrote into the lock file.

A killed holder (SIGKILL, OOM, node loss) needs no cleanup: the kernel drops an flock when the last
descriptor of its open file goes away. The descriptor is close-on-exec, but a child forked without
exec (a DataLoader worker) shares it until it exits too; so when the recorded holder is evidently
gone (same host and its pid is dead, or the holder is an earlier run of this very SLURM job, i.e. a
requeue, which SLURM starts only after ending the old one) the lock is waited for up to
`takeover_wait_s` instead of refused at once.

Shared filesystems: on NFSv4 Linux turns flock into a POSIX lock held by the server; a client that
dies releases it when its lease expires (90 s by default; the takeover wait covers it). Lustre
supports flock only when mounted with `-o flock` (cluster-wide); `-o localflock` gives locks that
only the same node sees, and without either option flock fails with ENOSYS. Where locking fails
(ENOLCK, ENOSYS, EOPNOTSUPP, EINVAL) the record alone decides: the holder refreshes a heartbeat in
it every `HEARTBEAT_S` seconds, and the record counts as live while its pid is alive (same host)
or its heartbeat is younger than `STALE_AFTER_S` (another host); otherwise it is taken over, with
a note. That fallback has a race (two starts in the same second both win), which a real lock does
not: prefer a filesystem with locks for run directories.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from mae_scale.errors import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunDirBusy(UserError):
    """Another live process holds the run directory (one line, naming it; exit status 2)."""


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "heartbeat": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def describe_holder(record: Optional[dict]) -> str:
    if not record:
        return "an unknown process (its record is unreadable)"
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"pid {record.get('pid')} on {record.get('host')}{job}, since {record.get('started')}"


def read_holder(run_dir: Path) -> Optional[dict]:
    """The record of the process holding (or that last held) `run_dir`, or None."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None


def _holder_gone(record: Optional[dict]) -> bool:
    """True when the recorded holder cannot be running any more (so a lock still held is about to go)."""
    if not record:
        return False
    same_host = record.get("host") == socket.gethostname()
    if same_host and isinstance(record.get("pid"), int):
        return not _pid_alive(record["pid"])
    job = os.environ.get("SLURM_JOB_ID")
    return job is not None and record.get("slurm_job_id") == job  # a requeue of this job: the old run ended


def _record_is_live(record: Optional[dict]) -> bool:
    """Lock-less filesystems: does the record name a process that may still run?"""
    if not record or record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        return False
    if _holder_gone(record):
        return False
    if record.get("host") == socket.gethostname():
        return True  # _holder_gone checked its pid: alive
    return time.time() - float(record.get("heartbeat") or 0) < STALE_AFTER_S


class RunLock:
    """The held lock of one run directory (rank 0), or a placeholder on the other ranks."""

    def __init__(self, path: Optional[Path], fd: Optional[int], locked: bool):
        self.path, self.fd, self.locked = path, fd, locked
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if fd is not None and not locked:  # lock-less fallback: keep the record fresh
            self._thread = threading.Thread(target=self._beat, name="runlock-heartbeat", daemon=True)
            self._thread.start()

    def _write_record(self) -> None:
        data = json.dumps(_holder_record()).encode()
        os.pwrite(self.fd, data, 0)  # then cut: a reader never sees an empty record
        os.ftruncate(self.fd, len(data))
        os.fsync(self.fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write_record()
            except OSError:
                pass  # a full disk must not kill the run over its heartbeat

    def release(self) -> None:
        """Give the directory up (also happens by itself when the process ends)."""
        self._stop.set()
        if self.fd is not None:
            import fcntl

            if self.locked:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: Path, takeover_wait_s: float = 180.0, poll_s: float = 0.5) -> RunLock:
    """Take `run_dir` for this process (no collective); raises RunDirBusy if a live process has it."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock = RunLock(path, fd, locked=True)
                break
            except BlockingIOError:
                holder = read_holder(run_dir)
                if not _holder_gone(holder):
                    raise RunDirBusy(f"run directory {run_dir} is in use by {describe_holder(holder)}; wait for that "
                                     "run to end or stop it, or choose another output_dir") from None
                deadline = deadline or time.monotonic() + takeover_wait_s
                if time.monotonic() > deadline:
                    raise RunDirBusy(f"run directory {run_dir} is still locked {takeover_wait_s:.0f} s after its "
                                     f"holder ({describe_holder(holder)}) ended; a child of it may still run: "
                                     f"end it, then run the same command again") from None
                time.sleep(poll_s)
            except OSError as exc:
                if exc.errno not in NO_LOCKS:
                    raise
                holder = read_holder(run_dir)
                if _record_is_live(holder):
                    raise RunDirBusy(f"run directory {run_dir} is in use by {describe_holder(holder)} (by its "
                                     "record: this filesystem has no file locks); wait for that run to end or "
                                     "stop it, or choose another output_dir") from None
                print(f"note: {run_dir} is on a filesystem without file locks ({os.strerror(exc.errno)}); "
                      "a second run started on it at the same moment would not be refused", flush=True)
                lock = RunLock(path, fd, locked=False)
                break
        lock._write_record()
        return lock
    except BaseException:
        os.close(fd)  # refused or failed: hold nothing (closing also drops a lock just taken)
        raise


def hold_run_dir(run_dir: Path, is_main: bool = True, takeover_wait_s: float = 180.0) -> RunLock:
    """Rank 0 takes the run directory; every rank raises RunDirBusy if it could not (a collective
    when a process group is up: call it on every rank, before anything is written to run_dir)."""
    import torch

    from mae_scale.distributed import broadcast_object

    lock, error = RunLock(None, None, locked=False), None
    if is_main:
        try:
            lock = acquire(run_dir, takeover_wait_s=takeover_wait_s)
        except RunDirBusy as exc:
            error = str(exc)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        error = broadcast_object(error)
    if error is not None:
        raise RunDirBusy(error)
    return lock
