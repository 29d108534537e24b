"""MLflow tracking on rank 0, tolerant of outages.

Every call goes through `_guarded`: the first failure prints one line and turns tracking off for
the rest of the process, so a tracking server that goes away never stops training. The default
store is SQLite beside the run directory (`RUN_DIR/../mlflow.db`, artifacts in
`RUN_DIR/../mlartifacts`); `$MLFLOW_TRACKING_URI` or `tracking.tracking_uri` points elsewhere.
A resumed run continues the same MLflow run (its id is kept in the checkpoint and the run dir).

Runs started at once beside each other (a job array, a sweep) share that SQLite file; MLflow creates
its tables on first use, and two processes doing so together collide ("duplicate column name"), and
two creating one experiment find it missing and both create it. So creating the store, the
experiment and the run is done under an exclusive flock on `mlflow.db.lock` beside the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

# MLflow's HTTP client retries for minutes by default; a training job should rather move on. A
# server that accepts connections but never answers (the slow outage) costs one 5 s timeout, a
# 1 s pause and one retry, about 11 s, once: then tracking is off for the run (measured with
# tools/measure_tracking_outage.py: 12.7 s; 65.1 s with 20 s timeouts and two retries).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

RUN_ID_FILE = "mlflow_run_id"
STORE_LOCK_WAIT_S = 120.0  # creating the tables takes a few seconds; a sweep of many runs queues up


@contextlib.contextmanager
def sqlite_store_lock(uri: str, wait_s: float = STORE_LOCK_WAIT_S, poll_s: float = 0.1):
    """An exclusive flock on `<db>.lock` for a `sqlite:///` store (nothing for other stores). Where
    the filesystem has no locks, or the wait runs out, it goes on without: as before the lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    path = db.with_name(db.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(poll_s)
            except OSError:  # no locks on this filesystem
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def default_tracking_uri(run_dir: Path, configured: str = "") -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


class Tracker:
    """Thin MLflow client; a no-op where disabled (ranks other than 0, tracking.enabled=false)."""

    def __init__(self, enabled: bool, uri: str, experiment: str, run_dir: Path):
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.run_id: Optional[str] = None
        self.client = None
        self.system_monitor = None

    def _guarded(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # any tracking failure: say so once, keep training
            self.enabled = False
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            print(f"warning: MLflow tracking failed while trying to {what} ({first}); "
                  f"training continues without tracking", file=sys.stderr, flush=True)
            return None

    def start(self, run_name: str, params: dict, run_id: Optional[str] = None) -> Optional[str]:
        """Create the run, or continue `run_id` (or the one recorded in the run dir) on resume."""
        if not self.enabled:
            return None
        run_id = run_id or self._recorded_run_id()
        with sqlite_store_lock(self.uri):
            return self._guarded("start the run", self._start, run_name, params, run_id)

    def _recorded_run_id(self) -> Optional[str]:
        path = self.run_dir / RUN_ID_FILE
        return path.read_text().strip() if path.is_file() else None

    def _start(self, run_name: str, params: dict, run_id: Optional[str]) -> str:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd
                artifacts = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name)
        self.run_id = run.info.run_id
        (self.run_dir / RUN_ID_FILE).write_text(self.run_id)
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return self.run_id

    def start_system_metrics(self, interval_s: float = 10.0) -> None:
        """MLflow's own sampler of CPU / GPU utilization and memory (a thread), as `system/...`
        metrics of this run; a resumed run continues their steps."""
        if self.run_id is None:
            return

        def start() -> None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system_monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                                       tracking_uri=self.uri)
            self.system_monitor.start()

        self._guarded("start system metrics", start)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._guarded("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.run_id is None:
            return
        self._guarded("log an artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        if self.run_id is None:
            return
        for key, value in tags.items():
            self._guarded("set a tag", self.client.set_tag, self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        if self.system_monitor is not None:
            self._guarded("stop system metrics", self.system_monitor.finish)
            self.system_monitor = None
        if self.run_id is None:
            return
        self._guarded("close the run", self.client.set_terminated, self.run_id, status)
