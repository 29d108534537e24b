"""One writer per run directory: a second process is refused in one line naming the holder; a
SIGKILLed holder's lock is taken over; a requeued SLURM job takes over its own earlier run's lock;
filesystems without locks fall back to the holder record."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from run_helpers import ROOT, base_overrides, pretrain_cmd, run_env, run_pretrain
from mae_scale import runlock
from mae_scale.runlock import LOCK_NAME, RunDirBusy, acquire, hold_run_dir, read_holder

# Takes the run directory, says so, then sleeps; with FORK=1 it first forks a child that keeps the
# inherited lock descriptor for a while (what a DataLoader worker does).
HOLDER = textwrap.dedent("""
    import os, sys, time
    from mae_scale.runlock import hold_run_dir
    lock = hold_run_dir(sys.argv[1])
    if os.environ.get("FORK") == "1" and os.fork() == 0:
        time.sleep(float(os.environ.get("CHILD_S", "2")))
        os._exit(0)
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture()
def start_holder(tmp_path):
    procs = []

    def start(run_dir, **env):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**run_env(), **{k: str(v) for k, v in env.items()}})
        line = proc.stdout.readline()
        assert line.strip() == "held", proc.stderr.read()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_process_is_refused_naming_the_holder(tmp_path, start_holder):
    holder = start_holder(tmp_path / "run", SLURM_JOB_ID="4242")
    with pytest.raises(RunDirBusy) as err:
        acquire(tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    assert f"pid {holder.pid}" in message and socket.gethostname() in message and "SLURM job 4242" in message
    record = read_holder(tmp_path / "run")
    assert record["pid"] == holder.pid and record["slurm_job_id"] == "4242"


def test_a_sigkilled_holder_is_taken_over(tmp_path, start_holder):
    holder = start_holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    lock = acquire(tmp_path / "run", takeover_wait_s=0)
    assert time.monotonic() - started < 2  # the kernel dropped the lock with the process
    assert read_holder(tmp_path / "run")["pid"] == os.getpid()
    lock.release()


def test_a_dead_holders_forked_child_delays_the_takeover_not_refuses_it(tmp_path, start_holder):
    holder = start_holder(tmp_path / "run", FORK=1, CHILD_S=3)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    lock = acquire(tmp_path / "run", takeover_wait_s=60, poll_s=0.1)  # the child still has the lock
    waited = time.monotonic() - started
    assert 0.5 < waited < 30, waited
    lock.release()


def test_same_process_twice_is_refused_then_released(tmp_path):
    lock = acquire(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
        acquire(tmp_path / "run", takeover_wait_s=0)
    lock.release()
    with hold_run_dir(tmp_path / "run"):
        pass


def test_a_requeued_slurm_job_waits_for_its_old_run_then_takes_over(tmp_path, start_holder, monkeypatch):
    """The old run of this job held the lock from another node (the record names that host), and
    its lock has not gone yet (an NFS lease): the new run waits instead of refusing; another job
    is refused at once."""
    run = tmp_path / "run"
    holder = start_holder(run, SLURM_JOB_ID="777")
    record = read_holder(run)
    record["host"] = "node-that-failed"
    (run / LOCK_NAME).write_text(json.dumps(record))

    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(RunDirBusy, match="SLURM job 777"):
        acquire(run, takeover_wait_s=30)

    monkeypatch.setenv("SLURM_JOB_ID", "777")
    threading.Timer(1.0, holder.kill).start()  # the old run's lock goes away a moment later
    started = time.monotonic()
    lock = acquire(run, takeover_wait_s=30, poll_s=0.1)
    assert 0.5 < time.monotonic() - started < 30
    assert read_holder(run)["slurm_job_id"] == "777" and read_holder(run)["pid"] == os.getpid()
    lock.release()


def test_without_file_locks_the_record_decides(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def record(**fields):
            base = {"host": socket.gethostname(), "pid": sleeper.pid, "slurm_job_id": None,
                    "started": "2026-01-01T00:00:00", "heartbeat": time.time()}
            (run / LOCK_NAME).write_text(json.dumps({**base, **fields}))

        record()  # a live process on this host
        with pytest.raises(RunDirBusy, match=f"pid {sleeper.pid}.*no file locks"):
            acquire(run)
        record(host="elsewhere")  # another host, fresh heartbeat
        with pytest.raises(RunDirBusy, match="elsewhere"):
            acquire(run)
        record(host="elsewhere", heartbeat=time.time() - 2 * runlock.STALE_AFTER_S)  # stale: taken over
        lock = acquire(run)
        assert "without file locks" in capsys.readouterr().out
        assert read_holder(run)["pid"] == os.getpid()
        lock.release()
        sleeper.kill()
        sleeper.wait()
        record()  # same host, the pid is dead: taken over
        acquire(run).release()
    finally:
        sleeper.kill()
        sleeper.wait()


# -- end to end (needs the trainer to call hold_run_dir and the CLI to map RunDirBusy to exit 2) ----

def test_a_second_pretrain_on_a_live_run_dir_is_refused(small_shards, tmp_path):
    out = tmp_path / "run"
    # long enough to outlive the second start on a loaded machine (the test kills it at the end)
    args = base_overrides(small_shards, out, **{"train.epochs": 1000, "train.max_steps": 8000,
                                                "checkpoint.every_steps": 100000})
    first = subprocess.Popen(pretrain_cmd(args), env=run_env(), cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file():  # the first run is training
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        second = run_pretrain(args, check=False, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = [x for x in second.stderr.splitlines() if x.startswith("error:")]  # torch may warn first
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and str(out) in lines[0], second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The killed run's directory is free again: a new start takes it over at once.
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 2}), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
