"""A real SLURM on this machine for the launcher tests (tests/slurm/slurm_up.sh: munge, slurmdbd
on MariaDB, slurmctld, two slurmd `node1`/`node2` on loopback; partitions `debug` and `high`, which
preempts `debug` by requeue). Needs root and apt; tests skip with the reason where it cannot run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent / "slurm"
ROOT = os.environ.get("LOCAL_SLURM_ROOT", "/tmp/local-slurm")


def unavailable_reason() -> Optional[str]:
    if os.name != "posix" or os.geteuid() != 0:
        return "a local SLURM needs root (tests/slurm/slurm_up.sh starts munged, slurmctld, slurmd)"
    have = all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch"))
    if not have and not (shutil.which("apt-get") and shutil.which("dpkg")):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def up(nodes: int = 2, cpus: Optional[int] = None) -> dict:
    """Start (or find running) the cluster; returns the environment to talk to it."""
    env = dict(os.environ, LOCAL_SLURM_ROOT=ROOT, LOCAL_SLURM_NODES=str(nodes), LOCAL_SLURM_GPUS="0")
    if cpus:
        env["LOCAL_SLURM_CPUS"] = str(cpus)
    proc = subprocess.run(["bash", str(HERE / "slurm_up.sh")], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"slurm_up.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"SLURM_CONF": f"{ROOT}/etc/slurm.conf", "already_up": "already up" in proc.stdout}


def down() -> None:
    subprocess.run(["bash", str(HERE / "slurm_down.sh")], capture_output=True, text=True,
                   env=dict(os.environ, LOCAL_SLURM_ROOT=ROOT), timeout=300)


def slurm(*args: str, check: bool = True) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def job_state(job_id: str) -> str:
    """SLURM's state of a job: squeue while it is known there, else sacct."""
    out = slurm("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).strip()
    if out:
        return out.splitlines()[0]
    out = slurm("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State", check=False).strip()
    return out.splitlines()[-1].split()[0] if out else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def metrics_step(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]
    return max(steps, default=0)


def wait_job_end(job_id: str, timeout: float) -> str:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
    return wait_for(lambda: (s := job_state(job_id)) in ended and s, timeout, f"job {job_id} to end", poll=1.0)


def job_logs(folder: Path) -> str:
    """The tail of every submitit log under a folder, for failure messages."""
    out = []
    for f in sorted(Path(folder).rglob("*_log.*")):
        out.append(f"--- {f}\n{f.read_text(errors='replace')[-2500:]}")
    return "\n".join(out)[-12000:]
