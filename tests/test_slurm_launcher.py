"""The SLURM launcher against a real SLURM (two simulated nodes on this machine, tests/slurm/):
a 2-node CPU pretraining (gloo) completes; a run requeued from outside, and a run preempted by a
`high` partition job, end at the configured step, resumed from a checkpoint, in one MLflow run.
Fast checks of the option handling (no cluster needed) come first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import slurm_cluster
from run_helpers import ROOT, SMOKE, base_overrides
from launchers import slurm as launcher
from mae_scale.checkpoint import latest_checkpoint, read_marker
from mae_scale.config import ConfigError


def _submit_args(shards, out, nodes=2, extra=(), steps=6, **over):
    values = {"train.max_steps": steps, "tracking.enabled": "true", "checkpoint.every_steps": 2, **over}
    return ["submit", "--config", str(SMOKE), "--nodes", str(nodes), "--gpus-per-node", "0", "--tasks-per-node", "1",
            "--partition", "debug", "--time", "00:20:00", *extra, *base_overrides(shards, out, **values)]


# -- no cluster needed -----------------------------------------------------------------------------

def test_dry_run_prints_sbatch_and_command(small_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert launcher.main(_submit_args(small_shards, out, extra=["--dry-run", "--qos", "q1", "--mem", "10G"])) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --qos=q1" in text
    assert "#SBATCH --mem=10G" in text and "#SBATCH --signal=USR2@120" in text and "#SBATCH --time=20" in text
    assert f"output_dir={out}" in text and "world size 2" in text
    assert not out.exists()  # nothing submitted, nothing written


def test_array_plans_one_run_dir_per_value(small_shards, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = _submit_args(small_shards, out, extra=["--dry-run", "--array", "optim.blr=1.0e-4,2.0e-4"])
    assert launcher.main(args) == 0
    text = capsys.readouterr().out
    assert f"run dir {out}/optim.blr=1.0e-4" in text and f"run dir {out}/optim.blr=2.0e-4" in text
    assert "#SBATCH --array=0-1%2" in text and "tracking.run_name=sweep/optim.blr=2.0e-4" in text


@pytest.mark.parametrize("bad, message", [
    (["--time", "soon"], "--time 'soon' must look like HH:MM:SS"),
    (["--array", "optim.blr"], "--array 'optim.blr' must look like key=v1,v2"),
    (["--nodes", "3"], "is not divisible by world size 3"),
    (["model.mask_ratio=2"], "model.mask_ratio=2"),
])
def test_bad_input_is_one_line_and_status_2(small_shards, tmp_path, capsys, bad, message):
    args = _submit_args(small_shards, tmp_path / "run", extra=["--dry-run"])
    if bad[0].startswith("--") and bad[0] in args:
        i = args.index(bad[0])
        args[i + 1] = bad[1]
    else:
        args += bad
    assert launcher.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("line, message", [
    ("cpus_per_task: ten", "cpus_per_task: 'ten' in cluster preset"),
    ("gpus_per_node: 1.5", "gpus_per_node: 1.5 in cluster preset"),
    ("signal_delay_s: true", "must be a whole number"),
    ("exclusive: 'yes'", "exclusive: 'yes' in cluster preset"),
    ("setup: module load cuda", "must be a list of shell lines"),
    ("additional_parameters: [a, b]", "must be a mapping of sbatch options"),
    ("mem: [64G]", "mem: ['64G'] in cluster preset"),
])
def test_a_cluster_preset_value_of_the_wrong_type_is_one_line(small_shards, tmp_path, capsys, line, message):
    preset = tmp_path / "cluster.yaml"
    preset.write_text(f"partition: gpu\n{line}\n")
    args = _submit_args(small_shards, tmp_path / "run", extra=["--dry-run", "--cluster", str(preset)])
    assert launcher.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_shipped_cluster_presets_load():
    for preset in (ROOT / "configs/cluster").glob("*.yaml"):
        assert launcher.load_cluster_preset(str(preset)), preset


def test_master_port_from_job_id():
    assert launcher.master_port("123") == launcher.master_port("123") and 20000 <= launcher.master_port("999999") < 40000
    assert launcher.master_port("100") != launcher.master_port("101")
    with pytest.raises(ConfigError):
        launcher.parse_time("0")
    assert launcher.parse_time("1-00:00:30") == 24 * 60 + 1 and launcher.parse_time("02:00:00") == 120


def test_status_prints_attempts_and_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints/step_00000004").mkdir(parents=True)
    (run / "checkpoints/step_00000004/COMPLETE").write_text(json.dumps(
        {"step": 4, "world_size": 2, "zero_stage": 1, "time": 0}))
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"):  # what status checks for in an old-format marker
        (run / "checkpoints/step_00000004" / name).write_bytes(b"x")
    rows = [{"time": "t0", "host": "h", "world_size": 2, "resumed_from_step": None, "slurm_job_id": "11",
             "slurm_nodelist": "node[1-2]", "mlflow_run_id": "abc"},
            {"time": "t1", "host": "h", "world_size": 2, "resumed_from_step": 4, "slurm_job_id": "11",
             "slurm_nodelist": "node[1-2]", "mlflow_run_id": "abc"}]
    (run / "attempts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert launcher.main(["status", str(run)]) == 0
    text = capsys.readouterr().out
    assert "node[1-2]" in text and "step_00000004 (step 4, world size 2, ZeRO-1" in text
    assert [l.split()[3] for l in text.splitlines()[2:4]] == ["-", "4"]


# -- a real SLURM ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    info = slurm_cluster.up(nodes=2)
    yield info
    if not info["already_up"] and os.environ.get("MAE_SCALE_KEEP_SLURM") != "1":
        slurm_cluster.down()


@pytest.fixture
def job_env(cluster, monkeypatch):
    """What sbatch hands to the tasks (--export=ALL): the cluster, one thread, the repository."""
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MAE_SCALE_DS_LOG_LEVEL", "WARNING")
    monkeypatch.delenv("MAE_SCALE_FAULT", raising=False)
    monkeypatch.chdir(ROOT)


def _submitted_job(out) -> str:
    rows = [json.loads(l) for l in (out / "slurm_jobs.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    return str(rows[0]["job_id"])


def _finish(out, job_id, timeout=240) -> None:
    state = slurm_cluster.wait_job_end(job_id, timeout)
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{slurm_cluster.job_logs(out / 'submitit')}"


def _mlflow_runs(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id])
    return runs


def _attempts(out):
    return [json.loads(l) for l in (out / "attempts.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_node_cpu_run_completes(small_shards, tmp_path, job_env):
    out = tmp_path / "run"
    assert launcher.main(_submit_args(small_shards, out, steps=4)) == 0
    job_id = _submitted_job(out)
    _finish(out, job_id)
    assert read_marker(latest_checkpoint(out))["step"] == 4
    (attempt,) = _attempts(out)
    assert attempt["world_size"] == 2 and attempt["slurm_job_id"] == job_id and attempt["slurm_nodelist"] == "node[1-2]"
    (run,) = _mlflow_runs(out)
    assert run.data.params["world_size"] == "2" and run.info.status == "FINISHED"
    status = subprocess.run([sys.executable, "-m", "mae_scale", "status", str(out)], capture_output=True, text=True,
                            cwd=ROOT)
    assert status.returncode == 0 and "step_00000004" in status.stdout and job_id in status.stdout


def _interrupt_midway_and_finish(out, job_id, interrupt, steps):
    slurm_cluster.wait_for(lambda: slurm_cluster.metrics_step(out) >= 3, 180, "step 3 (a checkpoint at step 2)")
    assert slurm_cluster.metrics_step(out) < steps, "the run ended before it could be interrupted"
    interrupt()
    _finish(out, job_id, timeout=900)
    assert read_marker(latest_checkpoint(out))["step"] == steps
    attempts = _attempts(out)
    assert len(attempts) >= 2 and attempts[0]["resumed_from_step"] is None
    assert all(a["resumed_from_step"] and a["resumed_from_step"] > 0 for a in attempts[1:])
    assert {a["slurm_job_id"] for a in attempts} == {job_id} and {a["world_size"] for a in attempts} == {2}
    (run,) = _mlflow_runs(out)  # one MLflow run across every attempt
    assert run.info.status == "FINISHED" and {a["mlflow_run_id"] for a in attempts} == {run.info.run_id}
    steps_logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # replayed steps replaced, not duplicated
    return attempts


@pytest.mark.slow
@pytest.mark.distributed
def test_requeued_run_resumes_and_finishes(small_shards, tmp_path, job_env):
    """`scontrol requeue` (what a node failure looks like): no checkpoint() call, the original
    pickle restarts, and the trainer resumes from its newest checkpoint on disk."""
    out, steps = tmp_path / "run", 24
    assert launcher.main(_submit_args(small_shards, out, steps=steps)) == 0
    job_id = _submitted_job(out)
    _interrupt_midway_and_finish(out, job_id, lambda: slurm_cluster.slurm("scontrol", "requeue", job_id), steps)


@pytest.mark.slow
@pytest.mark.distributed
def test_preempted_run_resumes_and_finishes(small_shards, tmp_path, job_env):
    """A `high` partition job takes both nodes: the debug job gets USR2 (submitit's checkpoint(),
    which resubmits the same callable), is requeued, and resumes once the high job is done."""
    out, steps = tmp_path / "run", 24
    assert launcher.main(_submit_args(small_shards, out, steps=steps)) == 0
    job_id = _submitted_job(out)
    preemptor = []

    def preempt():
        text = slurm_cluster.slurm("sbatch", "--parsable", "-p", "high", "-N", "2", "--exclusive", "-t", "2",
                                   "-o", "/dev/null", "--wrap", "sleep 3")
        preemptor.append(text.strip())

    _interrupt_midway_and_finish(out, job_id, preempt, steps)
    assert slurm_cluster.job_state(preemptor[0]) == "COMPLETED"
    log = "\n".join(p.read_text(errors="replace") for p in (out / "submitit").rglob("*_0_log.*"))
    assert "checkpoint" in log.lower() or "requeu" in log.lower()


@pytest.mark.slow
@pytest.mark.distributed
def test_run_at_its_time_limit_requeues_and_finishes(small_shards, tmp_path, job_env):
    """A 3-minute job with USR2 60 s before its end: submitit's checkpoint() requeues it, and the
    next start resumes from the newest checkpoint (a run longer than its time limit still ends).
    SLURM's signal timer is coarse (the USR2 may come up to 60 s early): with a 1-minute limit the
    USR2 came about 14 s after every start, before the first step, and the job requeued forever."""
    # 3000 steps take longer than the whole 3-minute limit even at this machine's best speed (~13 steps/s).
    out, steps = tmp_path / "run", 3000
    args = _submit_args(small_shards, out, steps=steps, extra=["--signal-delay-s", "60"],
                        **{"train.epochs": 400, "checkpoint.every_steps": 50, "train.log_every_steps": 50})
    args[args.index("--time") + 1] = "00:03:00"
    assert launcher.main(args) == 0
    job_id = _submitted_job(out)
    _finish(out, job_id, timeout=900)
    assert read_marker(latest_checkpoint(out))["step"] == steps
    attempts = _attempts(out)
    assert len(attempts) >= 2, "the run finished inside one time limit; make it longer"
    assert all(a["resumed_from_step"] and a["resumed_from_step"] > 0 for a in attempts[1:])
    (run,) = _mlflow_runs(out)
    assert run.info.status == "FINISHED"
