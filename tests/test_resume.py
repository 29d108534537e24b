"""Never losing a run: SIGKILL at any moment (also in the middle of a checkpoint save), a
non-finite loss, a tampered checkpoint. A resumed run ends with exactly the weights of an
uninterrupted one (bitwise, on CPU)."""

import json
import os
import signal
import subprocess
import time

import pytest

from ckpt_utils import assert_same_checkpoint
from untrusted_files import WritesFileOnLoad
from run_helpers import ROOT, base_overrides, pretrain_cmd, run_env, run_pretrain
from mae_scale.checkpoint import MARKER, complete_checkpoints, latest_checkpoint, read_marker


@pytest.fixture(scope="module")
def straight_world2(small_shards, tmp_path_factory):
    """The uninterrupted reference: 7 steps at world size 2, ZeRO-2, bf16."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 7, "train.zero_stage": 2}), nproc=2)
    return out


@pytest.mark.distributed
def test_kill_during_save_then_resume_is_exact(small_shards, tmp_path, straight_world2):
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"train.max_steps": 7, "train.zero_stage": 2})
    killed = run_pretrain(args, nproc=2, check=False, MAE_SCALE_FAULT="save:4")
    assert killed.returncode != 0
    # The step-4 files were written but the save never completed: not taken as the newest.
    assert (out / "checkpoints/step_00000004").is_dir()
    assert not (out / "checkpoints/step_00000004" / MARKER).exists()
    assert latest_checkpoint(out).name == "step_00000002"
    resumed = run_pretrain(args, nproc=2)
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert latest_checkpoint(out).name == "step_00000007"
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight_world2))
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert [a["resumed_from_step"] for a in attempts] == [None, 2]


def _wait_for_step(metrics, step, proc, deadline):
    while time.time() < deadline:
        if metrics.is_file() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines() if l):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def test_sigkill_at_a_random_moment_then_resume_is_exact(small_shards, tmp_path):
    extra = {"train.max_steps": 9, "train.zero_stage": 1, "train.precision": "fp32", "checkpoint.every_steps": 3}
    straight = tmp_path / "straight"
    run_pretrain(base_overrides(small_shards, straight, **extra))
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **extra)
    proc = subprocess.Popen(pretrain_cmd(args), env=run_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out / "metrics.jsonl", 5, proc, time.time() + 300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(out).name == "step_00000003"
    resumed = run_pretrain(args)
    assert "resumed from" in resumed.stdout
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight))
    # Metric rows of the replayed steps were replaced, not duplicated.
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(small_shards, tmp_path):
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"train.max_steps": 6})
    proc = run_pretrain(args, check=False, MAE_SCALE_FAULT="nan_loss:3")  # the 4th step's loss is NaN
    assert proc.returncode == 1
    assert "error: loss became nan at step 3" in proc.stderr and "step_00000002" in proc.stderr
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [2]
    # Rerunning resumes from the untouched checkpoint and finishes.
    run_pretrain(args)
    assert latest_checkpoint(out).name == "step_00000006"


def test_checkpoint_that_would_run_code_is_refused(small_shards, tmp_path):
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"train.max_steps": 2})
    run_pretrain(args)
    proof = tmp_path / "code_ran"
    import pickle

    ckpt = latest_checkpoint(out)
    with open(ckpt / "mp_rank_00_model_states.pt", "wb") as fh:
        pickle.dump({"module": WritesFileOnLoad(proof)}, fh)
    # the marker's checksum would refuse the new bytes first: record them, as a writer of the
    # malicious file could, so that the weights-only loader itself is what refuses it
    from mae_scale.checkpoint.integrity import file_checksum

    marker = read_marker(ckpt)
    marker["files"]["mp_rank_00_model_states.pt"] = list(file_checksum(ckpt / "mp_rank_00_model_states.pt"))
    (ckpt / MARKER).write_text(json.dumps(marker))
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4}), check=False)
    assert proc.returncode != 0 and "weights_only" in proc.stderr.replace("\n", " ")
    assert not proof.exists()
