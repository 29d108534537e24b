"""`mae-scale submit` and `mae-scale status`: MAE pretraining on SLURM through submitit.

One SLURM task per GPU (or, on a CPU-only cluster, `--tasks-per-node K` CPU tasks per node). Each
task reads its rank and the rendezvous from submitit's `JobEnvironment` (MASTER_ADDR = first host
of the job's node list, MASTER_PORT derived from the job id), exports the usual
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, and calls the ordinary pretraining entry:
`mae_scale.distributed` reads nothing SLURM-specific.

Surviving the cluster: the job is a submitit `Checkpointable`. On preemption or time-out
(SLURM sends USR2 before the kill) submitit calls `checkpoint()`, which resubmits the very same
callable, and the job is requeued. Nothing is pickled but the command line: the trainer resumes by
itself from the newest complete checkpoint in `output_dir` and continues the same MLflow run. An
external `scontrol requeue` (a node failure) skips `checkpoint()` and restarts the original pickle,
which ends the same way for the same reason. The work lost is at most `checkpoint.every_steps`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from mae_scale.config import ConfigError
from mae_scale.train.rundir import ATTEMPTS, CONFIG, METRICS, RESULT

SUBMITIT_DIR = "submitit"
# Generous: in short jobs submitit counts every USR2 as a time-out, and each preemption is one too.
MAX_NUM_TIMEOUT = 1000
# What a run leaves in its directory (the trainer, `submit`); `status` on a folder with none of them
# is a wrong path, not a run that has not started.
RUN_FILES = (CONFIG, ATTEMPTS, "checkpoints", "slurm_jobs.jsonl", RESULT, ".lock", METRICS, SUBMITIT_DIR)
# Every key a cluster preset may hold: what its value must be, and how to say so (YAML reads
# `cpus_per_task: ten` as text, which would otherwise end in a traceback at submit time); null is
# always allowed and means the default. `mem: 64G` is text, `time: 120` (minutes) a number: both
# are what sbatch takes.
_WHOLE_NUMBER = (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number")
_TEXT = (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "text")
CLUSTER_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s"), _WHOLE_NUMBER),
    **dict.fromkeys(("partition", "mem", "account", "qos", "constraint", "time"), _TEXT),
    "exclusive": (lambda v: isinstance(v, bool), "true or false"),
    "setup": (lambda v: isinstance(v, list) and all(isinstance(line, str) for line in v), "a list of shell lines"),
    "additional_parameters": (lambda v: isinstance(v, dict), "a mapping of sbatch options"),
}


def master_port(job_id: str) -> int:
    """A rendezvous port from the SLURM job id: the same on every node of a job, different for
    jobs that may share a node (array tasks each have their own SLURM_JOB_ID)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def export_rendezvous(environ: Optional[dict] = None) -> dict:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit's job environment
    (inside a SLURM task); returns what was set."""
    env = submitit.JobEnvironment()
    values = {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
              "LOCAL_WORLD_SIZE": str(env.num_tasks // max(env.num_nodes, 1)),
              "MASTER_ADDR": env.hostnames[0], "MASTER_PORT": str(master_port(os.environ.get("SLURM_JOB_ID") or env.raw_job_id))}
    target = os.environ if environ is None else environ
    target.update(values)
    return values


class PretrainJob(submitit.helpers.Checkpointable):
    """The callable submitit runs in every task: rendezvous variables, then `mae-scale VERB`
    (pretrain, finetune or linprobe).

    `checkpoint()` (called by submitit on preemption / time-out) resubmits this same object: the
    state lives in the run directory, not in the pickle."""

    def __init__(self, config: str, overrides: list[str], run_dir: str, verb: str = "pretrain"):
        self.config, self.overrides, self.run_dir, self.verb = config, list(overrides), run_dir, verb

    def command(self) -> list[str]:
        return [getattr(self, "verb", "pretrain"), "--config", self.config, *self.overrides]

    def __call__(self) -> int:
        export_rendezvous()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            os.environ.setdefault("OMP_NUM_THREADS", cpus)
        from mae_scale.train import run

        code = run(getattr(self, "verb", "pretrain"), self.config, self.overrides)
        if code != 0:
            raise RuntimeError(f"mae-scale {self.command()[0]} exited with status {code} (see the task logs in "
                               f"{Path(self.run_dir) / SUBMITIT_DIR})")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"PretrainJob({shlex.join(['mae-scale', *self.command()])})"


# -- parsing ------------------------------------------------------------------------------------

def parse_time(text: str) -> int:
    """SLURM time `[D-]HH:MM:SS`, `HH:MM` or minutes -> whole minutes (at least 1)."""
    try:
        days = 0
        if "-" in text:
            d, text = text.split("-", 1)
            days = int(d)
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
            seconds = 0
        elif len(parts) == 2:
            minutes, seconds = parts[0] * 60 + parts[1], 0
        elif len(parts) == 3:
            minutes, seconds = parts[0] * 60 + parts[1], parts[2]
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--time {text!r} must look like HH:MM:SS (or D-HH:MM:SS, HH:MM, minutes)") from None
    total = days * 24 * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ConfigError(f"--time {text!r} must be positive")
    return total


def parse_array(text: Optional[str]) -> Optional[tuple[str, list[str]]]:
    if not text:
        return None
    key, sep, values = text.partition("=")
    items = [v for v in values.split(",") if v != ""]
    if not sep or not key or not items:
        raise ConfigError(f"--array {text!r} must look like key=v1,v2,... e.g. optim.blr=1e-4,1.5e-4")
    if len(set(items)) != len(items):
        raise ConfigError(f"--array {text!r} repeats a value")
    return key, items


def load_cluster_preset(path: Optional[str]) -> dict:
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster preset {path} does not exist; see configs/cluster/")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"cluster preset {path} must hold a mapping")
    unknown = sorted(set(data) - set(CLUSTER_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]} in cluster preset {path}; allowed: {', '.join(sorted(CLUSTER_KEYS))}")
    for key, value in data.items():
        fits, expected = CLUSTER_KEYS[key]
        if value is not None and not fits(value):
            raise ConfigError(f"{key}: {value!r} in cluster preset {path} must be {expected}")
    return data


def _resolved(args: argparse.Namespace) -> dict:
    """Command-line options over the cluster preset over the defaults."""
    preset = load_cluster_preset(args.cluster)
    opts = {"gpus_per_node": 1, "tasks_per_node": None, "cpus_per_task": None, "partition": None, "time": None,
            "mem": None, "account": None, "qos": None, "constraint": None, "exclusive": False, "setup": [],
            "signal_delay_s": 120, "additional_parameters": {}}
    opts.update(preset)
    for key in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "partition", "time", "mem", "account", "qos",
                "constraint", "signal_delay_s"):
        value = getattr(args, key)
        if value is not None:
            opts[key] = value
    if args.exclusive:
        opts["exclusive"] = True
    if opts["time"] is None:
        raise ConfigError("--time is required (HH:MM:SS), on the command line or in the --cluster preset")
    if opts["partition"] is None:
        raise ConfigError("--partition is required, on the command line or in the --cluster preset")
    gpus = int(opts["gpus_per_node"])
    if gpus < 0:
        raise ConfigError(f"--gpus-per-node {gpus} must be >= 0")
    if gpus > 0 and opts["tasks_per_node"] not in (None, gpus):
        raise ConfigError(f"--tasks-per-node {opts['tasks_per_node']} must equal --gpus-per-node {gpus}: one task per GPU")
    tasks = gpus if gpus > 0 else (opts["tasks_per_node"] or 1)
    if int(tasks) <= 0:
        raise ConfigError(f"--tasks-per-node {tasks} must be positive")
    if args.nodes <= 0:
        raise ConfigError(f"--nodes {args.nodes} must be positive")
    # Also from a --cluster preset, which argparse does not see: 0 CPUs would be dropped silently
    # (no --cpus-per-task in the sbatch script), a negative delay would never warn the job.
    if opts["cpus_per_task"] is not None and int(opts["cpus_per_task"]) < 1:
        raise ConfigError(f"cpus_per_task {opts['cpus_per_task']} must be positive")
    if int(opts["signal_delay_s"]) < 0:
        raise ConfigError(f"signal_delay_s {opts['signal_delay_s']} must be 0 or more")
    opts["tasks_per_node"] = int(tasks)
    opts["timeout_min"] = parse_time(str(opts["time"]))
    return opts


def executor_parameters(opts: dict, nodes: int, job_name: str) -> dict:
    """submitit AutoExecutor parameters (slurm_* for the SLURM-only ones)."""
    params: dict[str, Any] = {
        "nodes": nodes, "tasks_per_node": opts["tasks_per_node"], "timeout_min": opts["timeout_min"],
        "slurm_partition": opts["partition"], "name": job_name, "slurm_signal_delay_s": int(opts["signal_delay_s"]),
    }
    if opts["gpus_per_node"]:
        params["gpus_per_node"] = int(opts["gpus_per_node"])
    if opts["cpus_per_task"]:
        params["cpus_per_task"] = int(opts["cpus_per_task"])
    if opts["mem"] is not None:
        params["slurm_mem"] = str(opts["mem"])
    for key in ("account", "qos", "constraint"):
        if opts[key]:
            params[f"slurm_{key}"] = str(opts[key])
    if opts["exclusive"]:
        params["slurm_exclusive"] = True
    if opts["setup"]:
        params["slurm_setup"] = list(opts["setup"])
    if opts["additional_parameters"]:
        params["slurm_additional_parameters"] = dict(opts["additional_parameters"])
    return params


def plan_runs(args: argparse.Namespace, world_size: int) -> list[dict]:
    """One entry per SLURM job (one, or one per --array value): run dir, overrides, MLflow name.
    Every config is loaded and checked here, before anything is submitted."""
    from mae_scale.config import check_batch_layout, load_config
    from mae_scale.finetune_config import load_finetune_config

    def load(config: str, overrides: list[str]):
        # scope "submit": everything but this machine's devices (a login node has no GPU; the job's nodes do)
        if args.verb == "pretrain":
            return load_config(config, overrides, scope="submit")
        return load_finetune_config(config, overrides, mode=args.verb, scope="submit")

    config = str(Path(args.config).resolve())
    base = load(config, args.overrides)
    run_dir = Path(base.output_dir).resolve()
    sweep = parse_array(args.array)
    runs = []
    for value in (sweep[1] if sweep else [None]):
        overrides = list(args.overrides)
        this_dir = run_dir
        if sweep:
            this_dir = run_dir / f"{sweep[0]}={value}"
            overrides.append(f"{sweep[0]}={value}")
        overrides.append(f"output_dir={this_dir}")
        cfg = load(config, overrides)  # refused here, before anything is submitted
        check_batch_layout(cfg, world_size)
        if sweep and not cfg.tracking.run_name:
            overrides.append(f"tracking.run_name={run_dir.name}/{sweep[0]}={value}")
        runs.append({"config": config, "overrides": overrides, "run_dir": this_dir, "verb": args.verb})
    return runs


def _sbatch_preview(params: dict, folder: Path, array: int) -> str:
    """The sbatch script submitit would write (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    translated = {}
    for key, value in params.items():
        key = key[len("slurm_"):] if key.startswith("slurm_") else key
        key = {"tasks_per_node": "ntasks_per_node", "name": "job_name", "timeout_min": "time"}.get(key, key)
        translated[key] = value
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=str(folder), map_count=array if array > 1 else None,
                               **translated)


def submit(args: argparse.Namespace) -> int:
    opts = _resolved(args)
    world = args.nodes * opts["tasks_per_node"]
    runs = plan_runs(args, world)
    root = Path(args.folder).resolve() if args.folder else (
        runs[0]["run_dir"].parent if len(runs) > 1 else runs[0]["run_dir"]) / SUBMITIT_DIR
    job_name = args.job_name or f"mae-{runs[0]['run_dir'].name if len(runs) == 1 else runs[0]['run_dir'].parent.name}"
    params = executor_parameters(opts, args.nodes, job_name)
    folder = root / "%j"
    jobs_desc = [PretrainJob(r["config"], r["overrides"], str(r["run_dir"]), r["verb"]) for r in runs]
    if args.dry_run:
        print(f"# {len(runs)} job(s), world size {world} = {args.nodes} node(s) x {opts['tasks_per_node']} task(s)"
              f"{' (one per GPU)' if opts['gpus_per_node'] else ' (CPU)'}; submitit folder {root}")
        print("# executor parameters: " + json.dumps(params, sort_keys=True) + f"; slurm_max_num_timeout {MAX_NUM_TIMEOUT}")
        for job in jobs_desc:
            print(f"# run dir {job.run_dir}\n#   each task runs: {' '.join(shlex.quote(a) for a in ['mae-scale', *job.command()])}")
        print(_sbatch_preview(params, folder, len(runs)))
        return 0

    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster_type, slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    executor.update_parameters(**params)
    for r in runs:
        r["run_dir"].mkdir(parents=True, exist_ok=True)
    if len(jobs_desc) == 1:
        jobs = [executor.submit(jobs_desc[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(job) for job in jobs_desc]
    for job, run in zip(jobs, runs):
        print(f"submitted job {job.job_id}: {run['run_dir']} (logs: {root / str(job.job_id)})")
        (run["run_dir"] / "slurm_jobs.jsonl").open("a").write(json.dumps(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_id": job.job_id, "world_size": world,
             "nodes": args.nodes, "tasks_per_node": opts["tasks_per_node"], "submitit_folder": str(root)}) + "\n")
    if args.wait:
        failed = 0
        for job in jobs:
            try:
                job.result()
            except Exception as exc:  # the job failed: say which and go on with the others
                first = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
                print(f"job {job.job_id} failed: {first}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    return 0


# -- status -------------------------------------------------------------------------------------

def _checkpoint_lines(run_dir: Path, verify: bool) -> tuple[list[str], bool]:
    """Lines about the run's checkpoints (newest complete, damaged ones, those moved aside) and
    whether any is damaged. Sizes are always checked; checksums only with `verify` (they re-read
    every file: seconds per GB)."""
    from mae_scale.checkpoint import DAMAGED_PREFIX, complete_checkpoints, read_marker
    from mae_scale.checkpoint.integrity import check_files, describe_error

    root = run_dir / "checkpoints"
    lines, damaged, newest_ok = [], False, None
    for _, ckpt in reversed(complete_checkpoints(root)):
        try:
            marker = read_marker(ckpt)
            if not isinstance(marker, dict):  # valid JSON that no save wrote: a damaged marker
                raise ValueError(f"a JSON {type(marker).__name__}, not an object")
            problems = check_files(ckpt, marker, checksums=verify)
        except (OSError, ValueError) as exc:
            marker, problems = None, [f"{ckpt / 'COMPLETE'} cannot be read ({describe_error(exc)})"]
        if problems:
            damaged = True
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            lines.append(f"damaged checkpoint {ckpt.name}: {problems[0]}{more}; the next start moves it aside "
                         "and resumes from the one before")
        elif newest_ok is None:
            newest_ok = (ckpt, marker)
    if newest_ok is None:
        lines.insert(0, "newest complete checkpoint: none yet" if not damaged else
                     "newest complete checkpoint: none intact")
    else:
        ckpt, marker = newest_ok
        saved = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(marker['time'])) if marker.get('time') else '?'
        checked = "checksums verified" if verify and marker.get("files") else (
            "sizes checked; --verify for checksums" if marker.get("files") else "written before checksums were recorded")
        lines.insert(0, f"newest complete checkpoint: {ckpt} (step {marker.get('step')}, world size "
                        f"{marker.get('world_size')}, ZeRO-{marker.get('zero_stage')}, saved {saved}; {checked})")
    for moved in sorted(root.glob(DAMAGED_PREFIX + "*")) if root.is_dir() else []:
        note = moved / "DAMAGED.txt"
        reason = note.read_text(errors="replace").strip() if note.is_file() else "?"
        lines.append(f"moved aside as damaged: {moved.name} ({reason})")
    return lines, damaged


def status_report(run_dir: Path, verify: bool = False) -> tuple[str, bool]:
    """The report and whether a complete checkpoint of the run is damaged."""
    from mae_scale.runlock import read_holder, describe_holder

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"run directory {run_dir} does not exist; pass a run's output_dir")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run directory; pass a run's output_dir")
    if not any((run_dir / name).exists() for name in RUN_FILES):
        raise ConfigError(f"{run_dir} is not a run directory (none of {', '.join(RUN_FILES)}); pass a run's "
                          "output_dir, as written by pretrain, finetune, linprobe or submit")
    lines = [f"run {run_dir.resolve()}"]
    attempts_file = run_dir / ATTEMPTS
    attempts, skipped = [], 0
    if attempts_file.is_file():
        # A report reads what it can: a torn or foreign line is counted and skipped, not a crash.
        for line in attempts_file.read_text(errors="replace").splitlines():
            if line.strip():
                try:
                    attempt = json.loads(line)
                except json.JSONDecodeError:
                    attempt = None
                if isinstance(attempt, dict):
                    attempts.append(attempt)
                else:
                    skipped += 1
    if attempts:
        lines.append(f"{'#':>3}  {'time':19}  {'world':>5}  {'resumed from':>12}  {'slurm job':>10}  {'nodes':12}  {'host':16}  mlflow run")
        for i, a in enumerate(attempts, 1):
            resumed = "-" if a.get("resumed_from_step") is None else str(a["resumed_from_step"])
            lines.append(f"{i:>3}  {str(a.get('time', '?')):19}  {str(a.get('world_size', '?')):>5}  {resumed:>12}  "
                         f"{str(a.get('slurm_job_id') or '-'):>10}  {str(a.get('slurm_nodelist') or '-'):12}  "
                         f"{str(a.get('host', '?')):16}  {a.get('mlflow_run_id') or '-'}")
    else:
        lines.append("no attempts recorded yet (the job has not started training)")
    if skipped:
        lines.append(f"{skipped} unreadable line(s) of {attempts_file} skipped")
    holder = read_holder(run_dir)
    if holder:  # a record that is not an object reads as "unreadable"
        lines.append(f"run directory last taken by {describe_holder(holder if isinstance(holder, dict) else None)}")
    ckpt_lines, damaged = _checkpoint_lines(run_dir, verify)
    lines += ckpt_lines
    result = run_dir / RESULT
    if result.is_file():
        try:
            finished = json.loads(result.read_text())
        except ValueError:  # JSON or UTF-8 decoding
            finished = None
        lines.append(f"finished: {finished.get('steps')} steps" if isinstance(finished, dict) else
                     f"{result} cannot be read")
    return "\n".join(lines), damaged


def status(args: argparse.Namespace) -> int:
    report, damaged = status_report(Path(args.run_dir), verify=getattr(args, "verify", False))
    print(report)
    return 1 if damaged else 0


# -- argparse wiring ----------------------------------------------------------------------------

def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    from mae_scale.cli_args import non_negative_int, positive_int

    p = subparsers.add_parser("submit", help="submit pretraining, fine-tuning or linear probing to SLURM "
                              "(submitit; requeues and resumes by itself)")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/pretrain/mae_vit_huge_patch14_800ep.yaml")
    p.add_argument("--verb", choices=["pretrain", "finetune", "linprobe"], default="pretrain",
                   help="what each task runs (default pretrain); the config must be a preset for that verb")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=non_negative_int, default=None,
                   help="one task per GPU (default 1; 0 for CPU tasks)")
    p.add_argument("--tasks-per-node", type=positive_int, default=None, help="CPU tasks per node where --gpus-per-node 0")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="wall-clock limit per job, HH:MM:SS")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--mem", default=None, help="memory per node, e.g. 400G")
    p.add_argument("--cpus-per-task", type=positive_int, default=None)
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--signal-delay-s", type=non_negative_int, default=None,
                   help="USR2 this many seconds before the time limit (default 120): submitit requeues the job then")
    p.add_argument("--cluster", default=None, help="cluster preset YAML (configs/cluster/); options given here win")
    p.add_argument("--array", default=None, help="key=v1,v2,...: one job, run directory and MLflow run per value")
    p.add_argument("--folder", default=None, help="submitit log folder (default RUN_DIR/submitit)")
    p.add_argument("--job-name", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and the command; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) to end; exit status 1 if one failed")
    p.add_argument("--cluster-type", default="slurm", help=argparse.SUPPRESS)  # submitit's 'local'/'debug' for tests
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    p.set_defaults(run=submit)
    return p


def add_status_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="attempts history and newest checkpoint of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--verify", action="store_true",
                   help="also re-read every checkpoint file against its checksum (exit 1 if one is damaged)")
    p.set_defaults(run=status)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry (`python -m launchers.slurm submit|status ...`) until mae-scale's CLI wires it."""
    parser = argparse.ArgumentParser(prog="mae-scale")
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_submit_parser(verbs)
    add_status_parser(verbs)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
