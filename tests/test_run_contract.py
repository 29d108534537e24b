"""What a run does when it is stopped, restarted with another config, or its logs were cut: SIGTERM /
SIGINT save and stop in one line (and the resumed run ends bit for bit where an uninterrupted one
ends), a second signal stops at once, a resume refuses config changes it cannot take silently, a
torn last log line is dropped, and a tracking server that hangs costs seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from ckpt_utils import assert_same_checkpoint
from run_helpers import ROOT, base_overrides, pretrain_cmd, run_env, run_pretrain
from mae_scale.checkpoint import complete_checkpoints, latest_checkpoint


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _start(args: list[str]) -> subprocess.Popen:
    """A run in its own process group, as SLURM and a terminal see one (loader workers included)."""
    return subprocess.Popen(pretrain_cmd(args), env=run_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(out, rows: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    _wait_for_file_lines(out / "metrics.jsonl", rows, proc, timeout)


def _wait_for_steps_of_attempt(out, attempt: int, steps: int, proc: subprocess.Popen) -> None:
    """A restarted run is training (its signal handlers installed): its start is recorded (after the
    resume cut metrics.jsonl back) and `steps` more rows have come since. Counting rows alone is not
    enough: the previous attempt may have left as many in the file before the cut."""
    _wait_for_file_lines(out / "attempts.jsonl", attempt, proc)
    _wait_for_rows(out, len((out / "metrics.jsonl").read_text().splitlines()) + steps, proc)


def _wait_for_file_lines(path, lines: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {lines} lines in time")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_stops_in_one_line_and_resume_is_exact(small_shards, tmp_path, signum):
    straight = tmp_path / "straight"
    extra = {"train.max_steps": 12, "checkpoint.every_steps": 100, "data.num_workers": 2}
    run_pretrain(base_overrides(small_shards, straight, **extra))
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **extra)
    proc = _start(args)
    _wait_for_rows(out, 3, proc)
    os.killpg(proc.pid, signum)  # the whole group: loader workers get it too
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    errors = _errors(stderr)
    assert len(errors) == 1 and f"stopped by {signal.Signals(signum).name}" in errors[0], stderr[-3000:]
    assert "saved checkpoint" in errors[0] and "Traceback" not in stderr
    stopped_at = latest_checkpoint(out)
    assert 3 <= int(stopped_at.name.split("_")[1]) < 12
    resumed = run_pretrain(args)
    assert f"resumed from {stopped_at}" in resumed.stdout
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_second_signal_stops_at_once_and_a_slow_save_is_not_started(small_shards, tmp_path):
    """signal_grace_s=0: the last save took longer, so the first SIGTERM stops without saving; the
    newest checkpoint is the last cadence save, complete and loadable."""
    out = tmp_path / "run"
    # Batches of 64 (not 16): a step long enough that the second SIGTERM, 50 ms after the first,
    # lands while the first is being handled, not after the stopped run gave the handlers back.
    args = base_overrides(small_shards, out, **{"train.max_steps": 200, "checkpoint.every_steps": 2,
                                                "checkpoint.signal_grace_s": 0, "train.global_batch_size": 64,
                                                "train.micro_batch_size": 32, "train.epochs": 40})
    proc = _start(args)
    _wait_for_rows(out, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "no checkpoint: the last save took" in _errors(stderr)[0]

    proc = _start(args)
    _wait_for_steps_of_attempt(out, 2, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "again: stopping at once" in stderr
    newest = complete_checkpoints(out / "checkpoints")[-1][0]
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": newest + 2, "checkpoint.every_steps": 2,
                                                      "checkpoint.signal_grace_s": 0, "train.global_batch_size": 64,
                                                      "train.micro_batch_size": 32, "train.epochs": 40}))


def test_resume_refuses_config_changes_it_cannot_take_silently(small_shards, tmp_path):
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 2}))
    before = (out / "config.yaml").read_text()

    # a change of the run itself: named, refused unless accepted
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4, "optim.blr": 2e-3}), check=False)
    assert proc.returncode == 2 and _errors(proc.stderr) == [
        "error: resuming this run directory would change the run: optim.blr: 0.001 -> 0.002; pass "
        "--accept-config-change to take it, or put it back"]
    assert (out / "config.yaml").read_text() == before and latest_checkpoint(out).name == "step_00000002"

    # what the checkpoint cannot take: refused even with the switch, before any size-mismatch traceback
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4, "data.input_size": 96}),
                        check=False)
    assert proc.returncode == 2 and "data.input_size: 64 -> 96" in _errors(proc.stderr)[0]
    assert "Traceback" not in proc.stderr

    # safe keys pass silently-but-listed; the accepted change is then the run's config
    cmd = pretrain_cmd(base_overrides(small_shards, out, **{"train.max_steps": 4, "optim.blr": 2e-3}))
    proc = subprocess.run([*cmd, "--accept-config-change"], capture_output=True, text=True, env=run_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming with a changed config: train.max_steps: 2 -> 4; optim.blr: 0.001 -> 0.002" in proc.stdout
    assert "blr: 0.002" in (out / "config.yaml").read_text()
    assert latest_checkpoint(out).name == "step_00000004"


def test_torn_last_log_line_is_dropped_on_resume(small_shards, tmp_path):
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 2}))
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "epoch": 0, "lo')  # a kill in the middle of a write
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4}))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_tracking_server_that_never_answers_costs_seconds(small_shards, tmp_path):
    """A server that accepts connections and then says nothing (the slow outage): one warning, and
    the run finishes (its cost, about 10 s with 5 s timeouts and one retry against 70 s with
    MLflow's defaults, is a measured figure in the README, not a timed assertion here)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
    port = silent.getsockname()[1]
    try:
        out = tmp_path / "run"
        proc = run_pretrain(base_overrides(small_shards, out, **{
            "tracking.enabled": "true", "train.max_steps": 2, "tracking.tracking_uri": f"http://127.0.0.1:{port}"}),
            timeout=600)
    finally:
        silent.close()
    assert proc.stderr.count("warning: MLflow tracking failed") == 1
    assert json.loads((out / "result.json").read_text())["steps"] == 2


def test_an_unexpected_crash_is_one_line_naming_the_traceback_file(tmp_path, monkeypatch, capsys):
    from mae_scale.cli import report_crash

    monkeypatch.delenv("MAE_SCALE_TRACEBACK", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    try:
        {}["missing"]
    except KeyError as exc:
        code = report_crash(exc)
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected KeyError: 'missing'")
    (saved,) = tmp_path.glob("mae-scale-crash-*.txt")
    assert saved.name in err and "Traceback" in saved.read_text() and "{}[\"missing\"]" in saved.read_text()
