"""MLflow tracking against a real store: the local SQLite default, and a real `mlflow server` on
127.0.0.1 that dies mid-run. Training never stops for tracking."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from run_helpers import ROOT, base_overrides, pretrain_cmd, run_env, run_pretrain


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_local_store_has_params_metrics_pictures_and_resume_continues_the_run(small_shards, tmp_path):
    out = tmp_path / "runs" / "tiny"
    args = base_overrides(small_shards, out, **{"tracking.enabled": "true", "train.max_steps": 3,
                                                "tracking.image_every_steps": 3, "tracking.system_metrics": "true"})
    run_pretrain(args, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1)
    run_id = json.loads((out / "result.json").read_text())["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mae_vit_tiny_patch16"
    assert run.data.params["train.global_batch_size"] == "16" and run.data.params["world_size"] == "1"
    assert {"loss", "lr", "images_per_s", "step_time_s", "data_wait_share", "tflops", "grad_norm"} <= set(run.data.metrics)
    assert any(name.startswith("system/cpu_utilization") for name in run.data.metrics)  # tracking.system_metrics
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert run.data.tags["last_checkpoint"].endswith("step_00000003")
    artifacts = _artifacts(client, run_id)
    assert "reconstructions/step_00000003.png" in artifacts and "loss_curve.png" in artifacts
    assert "config.yaml" in artifacts

    # Same output directory, longer run: resumes and continues the same MLflow run.
    run_pretrain(base_overrides(small_shards, out, **{"tracking.enabled": "true", "train.max_steps": 5}))
    assert json.loads((out / "result.json").read_text())["mlflow_run_id"] == run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_tracking_server_does_not_stop_training(small_shards, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is released
    out = tmp_path / "run"
    proc = run_pretrain(base_overrides(small_shards, out, **{"tracking.enabled": "true", "train.max_steps": 2,
                                                             "tracking.tracking_uri": f"http://127.0.0.1:{port}"}))
    assert proc.stderr.count("warning: MLflow tracking failed") == 1
    assert json.loads((out / "result.json").read_text())["steps"] == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    db = tmp_path / "server.db"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(tmp_path / "server-artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGKILL)
        raise AssertionError("mlflow server did not start")
    yield url, db, server
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)


def test_real_server_then_outage_mid_run(small_shards, tmp_path, mlflow_server):
    url, db, server = mlflow_server
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"tracking.enabled": "true", "train.epochs": 40,
                                                "train.max_steps": 40, "checkpoint.every_steps": 1000})
    proc = subprocess.Popen(pretrain_cmd(args), env=run_env(MLFLOW_TRACKING_URI=url), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(url)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the server has received a few loss values
        runs = client.search_runs(["0", *[e.experiment_id for e in client.search_experiments()]])
        if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 3:
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.3)
    else:
        raise AssertionError("no metrics reached the server")
    run_id = runs[0].info.run_id
    os.killpg(server.pid, signal.SIGKILL)  # the tracking server dies mid-run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("warning: MLflow tracking failed") == 1
    assert json.loads((out / "result.json").read_text())["steps"] == 40
    # What the server stored before it died is a real run with this run's params.
    stored = MlflowClient(f"sqlite:///{db}").get_run(run_id)
    assert stored.data.params["model.name"] == "mae_vit_tiny_patch16"


def _start_tracker(db: str, run_dir: str, barrier, out) -> None:
    from mae_scale.tracking import Tracker

    Path(run_dir).mkdir(parents=True)
    tracker = Tracker(True, f"sqlite:///{db}", "sweep", Path(run_dir))
    barrier.wait()  # every process opens the fresh store at the same moment
    out.put((run_dir, tracker.start(Path(run_dir).name, {"lr": 1}), tracker.enabled))


@pytest.mark.timeout(300)
def test_runs_starting_together_share_a_fresh_sqlite_store(tmp_path):
    """A sweep starting at once beside each other: each creates the tables / the experiment on first
    use; without the store lock two of them collide ('duplicate column name', the experiment created
    twice) and those runs go on untracked."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    db = tmp_path / "mlflow.db"
    procs = [ctx.Process(target=_start_tracker, args=(str(db), str(tmp_path / f"run{i}"), barrier, out))
             for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in range(n)]
    for p in procs:
        p.join(60)
    assert all(enabled and run_id for _, run_id, enabled in results), results
    client = MlflowClient(f"sqlite:///{db}")
    [exp] = [e for e in client.search_experiments() if e.name == "sweep"]
    assert sorted(r.info.run_id for r in client.search_runs([exp.experiment_id])) == sorted(r for _, r, _ in results)
