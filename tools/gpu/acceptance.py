#!/usr/bin/env python3
"""GPU acceptance: one command that turns a short GPU lease into measured figures.

    python3 tools/gpu/acceptance.py RESULTS_DIR [--cpu] [--budget-s 480] [--work-dir DIR] [--only STAGES]

(`tools/gpu/acceptance.sh RESULTS_DIR` first installs the offline wheelhouse; tools/gpu/README.md.)

Stages, each a subprocess with a time budget of its own; a stage that fails or runs out of time is
recorded with the tail of its output and the next stage still runs:

  tests       pytest -m cuda tests/cuda: nvJPEG decode, DeepSpeed ZeRO-1/2/3 kill + resume, export, fine-tune
  bench_step  mae-scale bench step --compare --compile: official baseline vs fast vs fast + compile
  bench_data  mae-scale bench data: decode on the GPU, and on 1 / 4 / 8 CPU workers, ImageNet-sized JPEGs
  pretrain    a real mae-scale pretrain of ViT-L/16, ZeRO-1, bf16, ~40 steps: the trainer's own figures
  plan        mae-scale plan of the ViT-H preset on 4 x 8 GPUs (activations measured on the GPU)

RESULTS_DIR receives at most five files, rewritten after every stage so that a run killed from
outside still leaves its figures: gpu_report.md (tables), gpu_report.json (everything, for
tooling), stages.log (each command's output, tail-capped), pytest_junit.xml, pretrain_metrics.jsonl.
The bulky things (shards, the pretraining run's multi-GB checkpoint, caches) go to --work-dir,
because the results must travel back from the GPU machine (a few small files).

--cpu runs every stage at toy sizes on a CPU (tests/cuda's DeepSpeed tests included, through
MAE_SCALE_CUDA_TESTS_ON_CPU=1; nvJPEG and the GPU decode skipped): the rehearsal of this very
script, tools/gpu/rehearse.sh. The exit status is 0 only if every stage passed.

Only the standard library is imported here: this process must stay up (and keep writing the
report) whatever a stage's imports do, and must not hold GPU memory while the stages run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
LOG_KEEP = 60_000  # characters of each command's output kept in stages.log (the file must stay small)
TAIL_LINES = 40  # lines of a failed command's output quoted in the report
RESERVE_S = 5  # kept back from the total budget for writing the last report

# Budgets (seconds) for the default --budget-s 480: one H200, everything cold (no compile cache).
# A different --budget-s scales them; what a stage leaves unused goes to the stages after it.
GPU_BUDGETS = {"env": 15, "tests": 130, "bench_step": 180, "bench_data": 45, "pretrain": 85, "plan": 20}
# --cpu on 2 shared cores: the tests stage runs nine tiny DeepSpeed pretrainings there.
CPU_BUDGETS = {"env": 20, "tests": 420, "bench_step": 60, "bench_data": 60, "pretrain": 120, "plan": 30}
STAGES = tuple(GPU_BUDGETS)

METRIC_KEYS = ("step", "epoch", "loss", "lr", "images_per_s", "step_time_s", "data_wait_s", "data_wait_share",
               "tflops", "mfu", "grad_norm", "mem_allocated_gib", "mem_reserved_gib", "sync_wait_s")


class Interrupted(Exception):
    """SIGTERM/SIGINT from outside (the lease's time limit): stop, write the report, leave."""


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


@dataclass
class Cmd:
    label: str
    argv: list[str]
    rc: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def summary(self) -> dict:
        return {"label": self.label, "argv": self.argv, "rc": self.rc, "timed_out": self.timed_out,
                "seconds": round(self.seconds, 1)}

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


@dataclass
class Stage:
    name: str
    budget_s: float  # planned
    allowed_s: float = 0.0  # what it got: its budget + what earlier stages left unused, within the total
    status: str = "pending"  # ok | failed | timeout | skipped | interrupted
    seconds: float = 0.0
    commands: list[Cmd] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tail: str = ""

    def to_json(self) -> dict:
        return {"status": self.status, "seconds": round(self.seconds, 1), "budget_s": round(self.budget_s),
                "allowed_s": round(self.allowed_s),
                "commands": [c.summary() for c in self.commands], "figures": self.figures, "notes": self.notes,
                "tail": self.tail}


class Acceptance:
    def __init__(self, args: argparse.Namespace):
        self.cpu = args.cpu
        self.results = Path(args.results_dir).resolve()
        self.work = Path(args.work_dir).resolve()
        self.results.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s - RESERVE_S
        base = CPU_BUDGETS if self.cpu else GPU_BUDGETS
        scale = (args.budget_s - RESERVE_S) / sum(base.values())
        self.stages = {n: Stage(n, base[n] * scale) for n in STAGES if n == "env" or n in args.only}
        self.meta = {"mode": "cpu rehearsal" if self.cpu else "gpu", "budget_s": args.budget_s,
                     "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "host": socket.gethostname(),
                     "results_dir": str(self.results), "work_dir": str(self.work)}
        self.env = dict(os.environ)
        # The project runs from the checkout (not installed); the wheelhouse's --target dir is already
        # on PYTHONPATH when acceptance.sh started us.
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p)
        self.env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.work / "inductor_cache"))
        self.env["PYTHONUNBUFFERED"] = "1"
        if self.cpu:
            self.env["OMP_NUM_THREADS"] = "1"  # docs/BENCHMARKS.md: on a shared 2-core CPU, 1 thread is repeatable
        (self.results / "stages.log").write_text("")
        self.shard_maker: subprocess.Popen | None = None
        self.child: subprocess.Popen | None = None

    # ---- time ------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    # ---- running commands ------------------------------------------------------------------------
    def run(self, stage: Stage, label: str, argv: list[str], timeout: float, env: dict | None = None) -> Cmd:
        cmd = Cmd(label, [str(a) for a in argv])
        stage.commands.append(cmd)
        out_path = self.work / "last_command.out"
        t0 = time.monotonic()
        with open(out_path, "w") as out:
            # A session of its own: a timeout ends the whole tree (pytest's pretrain subprocesses,
            # DataLoader workers, compile workers), not just the direct child.
            proc = subprocess.Popen(cmd.argv, cwd=ROOT, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.child = proc
            try:
                cmd.rc = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                cmd.timed_out = True
                _kill_group(proc)
                cmd.rc = proc.returncode
            except BaseException:
                _kill_group(proc)
                raise
            finally:
                self.child = None
                cmd.seconds = time.monotonic() - t0
                cmd.output = out_path.read_text(errors="replace")
                self._log(cmd)
        return cmd

    def _log(self, cmd: Cmd) -> None:
        text = cmd.output if len(cmd.output) <= LOG_KEEP else "[... cut ...]\n" + cmd.output[-LOG_KEEP:]
        state = "TIMED OUT" if cmd.timed_out else f"rc {cmd.rc}"
        with open(self.results / "stages.log", "a") as fh:
            fh.write(f"\n===== {cmd.label}: {' '.join(cmd.argv)}\n===== {state}, {cmd.seconds:.1f} s\n{text}\n")

    def mae_scale(self, *args) -> list[str]:
        return [PY, "-m", "mae_scale", *map(str, args)]

    # ---- the report ------------------------------------------------------------------------------
    def write_report(self) -> None:
        from_start = time.monotonic() - self.t0
        data = {"meta": {**self.meta, "elapsed_s": round(from_start, 1)},
                "stages": {n: s.to_json() for n, s in self.stages.items()}}
        _atomic_write(self.results / "gpu_report.json", json.dumps(data, indent=1, default=str))
        _atomic_write(self.results / "gpu_report.md", render_markdown(data))

    # ---- the run ---------------------------------------------------------------------------------
    def main(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)
        interrupted = False
        for name, stage in self.stages.items():
            if interrupted:
                stage.status, stage.notes = "skipped", ["the acceptance was interrupted before this stage"]
                continue
            # A stage's time: its own budget plus whatever the stages before it left unused (what is
            # left minus the budgets of the stages after it), never past the overall deadline.
            later = sum(s.budget_s for s in list(self.stages.values())[list(self.stages).index(name) + 1:])
            allowed = min(self.left(), self.left() - later)
            if allowed < 8:
                stage.status, stage.notes = "skipped", [f"no time left ({self.left():.0f} s of the total budget)"]
                self.write_report()
                continue
            stage.allowed_s = allowed
            t0 = time.monotonic()
            try:
                getattr(self, f"stage_{name}")(stage, t0 + allowed)
                if stage.status == "pending":
                    bad = [c for c in stage.commands if not c.ok]
                    stage.status = ("timeout" if any(c.timed_out for c in bad) else "failed") if bad else "ok"
            except Interrupted as exc:
                stage.status, interrupted = "interrupted", True
                stage.notes.append(f"interrupted by {exc}")
            except Exception as exc:  # a bug or a surprise in this script: record it, go on
                stage.status = "failed"
                stage.notes.append(f"acceptance.py raised {type(exc).__name__}: {exc}")
            stage.seconds = time.monotonic() - t0
            failed = [c for c in stage.commands if not c.ok]
            if failed and not stage.tail:
                stage.tail = failed[-1].tail()
            self.write_report()
            print(f"[acceptance] {name}: {stage.status} in {stage.seconds:.0f} s "
                  f"({self.left():.0f} s of the budget left)", flush=True)
        if self.shard_maker is not None and self.shard_maker.poll() is None:
            _kill_group(self.shard_maker)
        self.write_report()
        bad = {n: s.status for n, s in self.stages.items() if s.status != "ok"}
        print(f"[acceptance] report: {self.results / 'gpu_report.md'}", flush=True)
        if bad:
            print(f"[acceptance] not ok: {bad}", flush=True)
        return 124 if interrupted else (1 if bad else 0)

    # ---- stage 0: the machine --------------------------------------------------------------------
    def stage_env(self, stage: Stage, until: float) -> None:
        self.start_shards()  # CPU work that overlaps the GPU-bound stages before bench_data needs it
        probe = (
            "import json, platform, importlib.metadata as md, importlib.util as iu\n"
            "import torch\n"
            "def v(n):\n"
            "    try: return md.version(n)\n"
            "    except Exception: return None\n"
            "d = {'python': platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda,\n"
            "     'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,\n"
            "     'cuda_available': torch.cuda.is_available(), 'cpu_count': __import__('os').cpu_count()}\n"
            "for n in ('torchvision', 'timm', 'deepspeed', 'pydantic', 'webdataset', 'submitit', 'numpy', 'pillow',\n"
            "          'safetensors', 'triton', 'mlflow', 'pytest', 'pytest-timeout'):\n"
            "    d[n] = v(n)\n"
            "spec = iu.find_spec('deepspeed'); d['deepspeed_from'] = spec.origin if spec else None\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    d.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),\n"
            "             capability='%d.%d' % (p.major, p.minor), gpu_count=torch.cuda.device_count())\n"
            "print('ENV ' + json.dumps(d))\n")
        cmd = self.run(stage, "versions", [PY, "-c", probe], timeout=until - time.monotonic())
        for line in cmd.output.splitlines():
            if line.startswith("ENV "):
                stage.figures.update(json.loads(line[4:]))
        stage.figures["platform"] = platform.platform()
        stage.figures["commit"] = _git_commit()
        if shutil.which("nvidia-smi"):
            smi = self.run(stage, "nvidia-smi", ["nvidia-smi"], timeout=min(20, until - time.monotonic()))
            stage.figures["nvidia_smi"] = smi.output.strip()
        else:
            stage.figures["nvidia_smi"] = None
            if not self.cpu:
                stage.notes.append("nvidia-smi is not on PATH")
        if not self.cpu and not stage.figures.get("cuda_available"):
            stage.status = "failed"
            stage.notes.append("torch sees no CUDA device: every GPU figure below is missing")
        if stage.figures.get("deepspeed") is None:
            stage.notes.append("deepspeed is not importable: was the wheelhouse installed (tools/gpu/acceptance.sh)?")

    # ---- the shards (made in the background from the first stage on) ----------------------------
    def shard_spec(self) -> dict:
        if self.cpu:  # small real photos, enough for two workers and a few batches
            return {"n": 64, "min_side": 120, "max_side": 160, "per_shard": 16}
        # ImageNet's typical JPEG: about 500 x 375, quality 90 (make_sample_folder writes q90)
        return {"n": 2048, "min_side": 375, "max_side": 500, "per_shard": 128}

    def shard_dir(self) -> Path:
        s = self.shard_spec()
        return self.work / f"shards_n{s['n']}_{s['min_side']}-{s['max_side']}"

    def start_shards(self) -> None:
        out = self.shard_dir()
        if (out / "shards" / "manifest.json").is_file():
            return  # made by an earlier run on this machine
        s = self.shard_spec()
        code = ("import sys\n"
                "from data_pipeline import make_sample_folder, write_shards\n"
                f"make_sample_folder({str(out / 'images')!r}, n_images={s['n']}, seed=0, "
                f"min_side={s['min_side']}, max_side={s['max_side']})\n"
                f"write_shards({str(out / 'images')!r}, {str(out / 'shards.tmp')!r}, "
                f"samples_per_shard={s['per_shard']}, seed=0, progress=False)\n"
                f"import os; os.replace({str(out / 'shards.tmp')!r}, {str(out / 'shards')!r})\n")
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "shards.tmp", ignore_errors=True)
        self.shards_log = open(self.work / "make_shards.out", "w")
        self.shard_maker = subprocess.Popen([PY, "-c", code], cwd=ROOT, env=self.env, stdout=self.shards_log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.shards_t0 = time.monotonic()

    def wait_shards(self, stage: Stage, until: float) -> Path | None:
        shards = self.shard_dir() / "shards"
        if self.shard_maker is None and not (shards / "manifest.json").is_file():
            self.start_shards()
        if self.shard_maker is not None:
            try:
                rc = self.shard_maker.wait(timeout=max(until - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                stage.notes.append("making the shards did not finish within this stage's time")
                return None
            if rc != 0:
                out = (self.work / "make_shards.out").read_text(errors="replace")
                stage.notes.append(f"making the shards failed (rc {rc})")
                stage.tail = "\n".join(out.splitlines()[-TAIL_LINES:])
                return None
            self.meta["shards_made_s"] = round(time.monotonic() - self.shards_t0, 1)
            self.shard_maker = None
        manifest = json.loads((shards / "manifest.json").read_text())
        self.meta["shards"] = {**self.shard_spec(), "dir": str(shards), "files": len(manifest["shards"]),
                               "bytes": sum(s["bytes"] for s in manifest["shards"]), "total": manifest["total"]}
        return shards

    # ---- stage 1: the CUDA tests -----------------------------------------------------------------
    def stage_tests(self, stage: Stage, until: float) -> None:
        junit = self.results / "pytest_junit.xml"
        records = self.work / "test_records.jsonl"
        records.unlink(missing_ok=True)
        env = {**self.env, "MAE_SCALE_TEST_RECORD": str(records)}
        if self.cpu:  # the DeepSpeed tests' code, proven on the CPU before the lease
            env["MAE_SCALE_CUDA_TESTS_ON_CPU"] = "1"
        # No -x: every test reports. No --timeout flag: pytest-timeout may be missing on the GPU image;
        # the stage's own timeout bounds the whole run.
        cmd = self.run(stage, "pytest -m cuda", [PY, "-m", "pytest", "-m", "cuda", "tests/cuda", "-p", "no:cacheprovider",
                                                 "-rA", "-o", "addopts=", f"--junitxml={junit}"],
                       timeout=until - time.monotonic(), env=env)
        stage.figures["tests"] = _junit_cases(junit)
        counts: dict[str, int] = {}
        for case in stage.figures["tests"]:
            counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
        stage.figures["counts"] = counts
        if records.is_file():
            stage.figures["records"] = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
        if cmd.ok and not self.cpu and counts.get("skipped"):
            stage.status = "failed"
            stage.notes.append(f"{counts['skipped']} CUDA test(s) skipped on a GPU machine")
        if cmd.ok and not counts.get("passed"):
            stage.status = "failed"
            stage.notes.append("no test passed")

    # ---- stage 2: the training step --------------------------------------------------------------
    def stage_bench_step(self, stage: Stage, until: float) -> None:
        if self.cpu:  # no --compile: a cold inductor compile alone takes minutes on this CPU
            plan = [("mae_vit_tiny_patch16", 4, 64, ["--steps", 2, "--warmup", 1, "--repeats", 2], False, 1.0)]
        else:
            # (model, batch, px, timing, compile, share of the stage); ViT-H builds and compiles longest
            timing = ["--steps", 5, "--warmup", 3, "--repeats", 3]
            plan = [("mae_vit_base_patch16", 128, 224, timing, True, 0.27),
                    ("mae_vit_large_patch16", 64, 224, timing, True, 0.33),
                    ("mae_vit_huge_patch14", 64, 224, timing, True, 0.40)]
        stage.figures["runs"] = []
        for i, (model, batch, px, timing, compile_, share) in enumerate(plan):
            rest = sum(p[-1] for p in plan[i:])
            timeout = (until - time.monotonic()) * share / rest
            argv = self.mae_scale("bench", "step", "--model", model, "--batch", batch, "--img-size", px,
                                  "--precision", "bf16", "--compare", *(["--compile"] if compile_ else []), *timing,
                                  "--json")
            cmd = self.run(stage, f"bench step {model}", argv, timeout)
            result = _last_json(cmd.output)
            if result is None and compile_ and until - time.monotonic() > 30:
                # Compilation is what runs long; the eager baseline-vs-fast figures are still worth having.
                stage.notes.append(f"{model}: --compile run {'timed out' if cmd.timed_out else 'failed'}; "
                                   "reran without --compile")
                argv.remove("--compile")
                left = (until - time.monotonic()) * share / rest if i + 1 < len(plan) else until - time.monotonic()
                cmd = self.run(stage, f"bench step {model} (no compile)", argv, left)
                result = _last_json(cmd.output)
            if result is not None:
                stage.figures["runs"].append(_bench_step_figures(result))

    # ---- stage 3: the loader ---------------------------------------------------------------------
    def stage_bench_data(self, stage: Stage, until: float) -> None:
        shards = self.wait_shards(stage, until)
        if shards is None:
            stage.status = "failed"
            return
        names = [s["name"] for s in json.loads((shards / "manifest.json").read_text())["shards"]]

        def subset(fraction: float) -> str:  # fewer images for fewer workers: each pass takes similar time
            k = max(1, round(len(names) * fraction))
            return str(shards) if k >= len(names) else f"{shards}/{{{','.join(names[:k])}}}"

        if self.cpu:
            common = ["--batch", 8, "--img-size", 64, "--repeats", 1]
            plan = [("cpu-batched", 0, 1.0), ("cpu", 0, 1.0), ("cpu", 1, 0.5)]  # 0.5: the subset path too
        else:
            common = ["--batch", 64, "--img-size", 224, "--repeats", 2]
            plan = [("cuda", 4, 1.0), ("cpu", 1, 0.125), ("cpu", 4, 0.5), ("cpu", 8, 1.0)]
        stage.figures["runs"] = []
        for i, (device, workers, fraction) in enumerate(plan):
            timeout = (until - time.monotonic()) / (len(plan) - i)
            cmd = self.run(stage, f"bench data {device} x{workers}",
                           self.mae_scale("bench", "data", subset(fraction), "--workers", workers,
                                          "--decode-device", device, *common, "--json"), timeout)
            result = _last_json(cmd.output)
            if result is not None:
                ours = next(k for k in result["medians"] if k.startswith("project"))
                official = next(k for k in result["medians"] if k.startswith("official"))
                stage.figures["runs"].append({
                    "decode_device": device, "workers": workers, "samples": result["samples"],
                    "project_images_per_s": result["medians"][ours], "project_per_core": result["per_core"][ours],
                    "official_images_per_s": result["medians"][official], "x_official": result["ratio"]})

    # ---- stage 4: a real pretraining run ---------------------------------------------------------
    def stage_pretrain(self, stage: Stage, until: float) -> None:
        shards = self.wait_shards(stage, until)
        if shards is None:
            stage.status = "failed"
            return
        run_dir = self.work / "pretrain_run"
        shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would resume and stop at once
        if self.cpu:
            config, steps = "configs/pretrain/mae_vit_tiny_smoke.yaml", 4
            extra = ["data.input_size=64", "train.global_batch_size=16", "train.micro_batch_size=8",
                     "data.num_workers=1", "train.log_every_steps=2"]
        else:
            config, steps = "configs/pretrain/mae_vit_large_patch16_800ep.yaml", 40
            extra = ["model.name=mae_vit_large_patch16", "train.global_batch_size=64", "train.micro_batch_size=64",
                     "data.num_workers=8", "train.log_every_steps=5"]
        argv = self.mae_scale("pretrain", "--config", config, f"output_dir={run_dir}",
                              f"data.train_shards={shards}", f"train.max_steps={steps}", "train.precision=bf16",
                              "train.zero_stage=1", "tracking.enabled=false", "checkpoint.every_steps=100000",
                              *extra)
        cmd = self.run(stage, "pretrain", argv, until - time.monotonic())
        metrics = run_dir / "metrics.jsonl"
        rows = []
        if metrics.is_file():
            shutil.copyfile(metrics, self.results / "pretrain_metrics.jsonl")
            for line in metrics.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        stage.figures.update(_pretrain_figures(rows, steps))
        stage.figures["config"] = config
        stage.figures["overrides"] = argv[argv.index(config) + 1:]
        stage.figures["wall_s"] = round(cmd.seconds, 1)
        for line in cmd.output.splitlines():
            if line.startswith("run ") or "compile" in line.lower() and len(line) < 300:
                stage.figures.setdefault("log_lines", []).append(line.strip())
        if cmd.ok and len(rows) == 0:
            stage.status = "failed"
            stage.notes.append("the run finished but wrote no metrics.jsonl rows")

    # ---- stage 5: the memory plan ----------------------------------------------------------------
    def stage_plan(self, stage: Stage, until: float) -> None:
        cmd = self.run(stage, "plan", self.mae_scale("plan", "--config", "configs/pretrain/mae_vit_huge_patch14_800ep.yaml",
                                                     "--nodes", 4, "--gpus-per-node", 8),
                       until - time.monotonic())
        keep = [line for line in cmd.output.splitlines()
                if not line.startswith(("[20", "W1", "W0", "I1", "I0")) and "WARNING" not in line]
        stage.figures["table"] = "\n".join(keep).strip()
        stage.figures["activations"] = next((line for line in keep if line.startswith("activations:")), None)


# ---- helpers ---------------------------------------------------------------------------------------

def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is still there after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a kill mid-write leaves the previous complete report, never half of one


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _last_json(output: str) -> dict | None:
    """The last line of a command's output that is a JSON object (--json prints one; logs surround it)."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _junit_cases(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return []
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
                break
        cases.append({"id": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 1), "message": message})
    return cases


def _bench_step_figures(r: dict) -> dict:
    rows = [{k: row.get(k) for k in ("variant", "setup", "images_per_s", "step_s", "achieved_tflops", "mfu",
                                     "peak_mem_gib", "speedup_vs_first", "warmup_s")} for row in r.get("rows", [])]
    speedup = {row["variant"]: row["speedup_vs_first"] for row in rows}
    return {"model": r.get("model"), "batch": r.get("batch"), "img_size": r.get("img_size"), "device": r.get("device"),
            "gflop_per_image": r.get("gflop_per_image"), "steps": r.get("steps"), "warmup": r.get("warmup"),
            "repeats": r.get("repeats"), "mem_kind": r.get("mem_kind"), "rows": rows,
            "fast_x_baseline": speedup.get("fast"), "compile_x_baseline": speedup.get("fast + compile")}


def _pretrain_figures(rows: list[dict], steps: int) -> dict:
    """The trainer's logged rows, read defensively: a key the trainer does not (yet) write is 'n/a'.
    The summary leaves out the first row: it carries start-up and compilation."""
    table = [{k: row.get(k, "n/a") for k in METRIC_KEYS} for row in rows]
    steady = rows[1:] if len(rows) > 1 else rows
    summary = {}
    for k in ("images_per_s", "step_time_s", "data_wait_s", "data_wait_share", "tflops", "mfu", "grad_norm",
              "mem_allocated_gib", "mem_reserved_gib", "sync_wait_s"):
        values = [row[k] for row in steady if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)]
        summary[k] = statistics.median(values) if values else "n/a"
    return {"rows": table, "logged_rows": len(rows), "last_step": rows[-1].get("step") if rows else None,
            "target_steps": steps, "first_loss": rows[0].get("loss") if rows else None,
            "last_loss": rows[-1].get("loss") if rows else None, "steady_median": summary,
            "first_row_step_time_s": rows[0].get("step_time_s", "n/a") if rows else None}


# ---- the markdown report -----------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits, len(str(int(abs(v)))))}g}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out


def render_markdown(data: dict) -> str:
    meta, stages = data["meta"], data["stages"]
    env = stages.get("env", {}).get("figures", {})
    lines = [f"# GPU acceptance report ({meta['mode']})", "",
             f"Started {meta['started_utc']} UTC on {meta['host']}; {meta['elapsed_s']} s of a {meta['budget_s']} s budget.", ""]
    lines += ["## Stages", ""]
    lines += _table(["stage", "status", "seconds", "budget s", "allowed s", "notes"],
                    [[n, s["status"], s["seconds"], s["budget_s"], s["allowed_s"], "; ".join(s["notes"]) or ""]
                     for n, s in stages.items()])
    lines += ["", "## Environment", ""]
    keys = ["python", "torch", "torch_cuda", "cudnn", "torchvision", "timm", "deepspeed", "deepspeed_from", "pydantic",
            "webdataset", "submitit", "numpy", "pillow", "triton", "mlflow", "pytest", "pytest-timeout", "gpu",
            "gpu_count", "gpu_memory_gib", "capability", "cpu_count", "platform", "commit"]
    lines += _table(["what", "version / value"], [[k, _fmt(env.get(k))] for k in keys])
    if meta.get("shards"):
        s = meta["shards"]
        lines += ["", f"Shards: {s['total']} JPEGs (quality 90, sides {s['min_side']}-{s['max_side']} px) from the "
                      f"built-in photos, {s['files']} shards, {s['bytes'] / 2**20:.0f} MiB, made in "
                      f"{meta.get('shards_made_s', 'n/a')} s (in the background)."]
    if env.get("nvidia_smi"):
        lines += ["", "```", env["nvidia_smi"], "```"]

    t = stages.get("tests", {}).get("figures", {})
    if t:
        lines += ["", "## 1. CUDA tests (pytest -m cuda tests/cuda)", "", f"Counts: {t.get('counts')}", ""]
        lines += _table(["test", "outcome", "seconds", "message"],
                        [[c["id"], c["outcome"], c["seconds"], c["message"]] for c in t.get("tests", [])])
        records = t.get("records") or []
        resume = [r for r in records if r.get("test") == "resume"]
        if resume:
            lines += ["", "Kill + resume vs uninterrupted (tests/cuda/test_gpu_resume.py):", ""]
            lines += _table(["ZeRO", "device", "bitwise", "max abs diff (all checkpoint tensors)",
                             "weight diff / travel (tol)", "max loss rel diff (tol)"],
                            [[r["zero"], r["device"], r["bitwise"], r["max_abs_diff"],
                              f"{_fmt(r['rel_weight_diff'])} ({r['weight_tol']})",
                              f"{_fmt(r['max_loss_rel_diff'])} ({r['loss_tol']})"] for r in resume])
        other = [r for r in records if r.get("test") != "resume"]
        if other:
            lines += ["", "Other recorded figures:", ""] + [f"- `{json.dumps(r)}`" for r in other]

    b = stages.get("bench_step", {}).get("figures", {})
    for run in b.get("runs", []):
        lines += ["", f"## 2. Training step: {run['model']}, batch {run['batch']}, {run['img_size']} px "
                      f"({_fmt(run['gflop_per_image'])} GFLOP/image), {run['device']}", ""]
        lines += _table(["variant", "setup", "images/s", "step ms", "TFLOP/s", "MFU", "peak GiB", "x baseline",
                         "warmup s"],
                        [[r["variant"], r["setup"], r["images_per_s"], r["step_s"] * 1000, r["achieved_tflops"],
                          f"{r['mfu'] * 100:.1f} %" if isinstance(r["mfu"], (int, float)) else "n/a", r["peak_mem_gib"],
                          r["speedup_vs_first"], r["warmup_s"]] for r in run["rows"]])
        lines += ["", f"fast x baseline: {_fmt(run['fast_x_baseline'])}; fast + compile x baseline: "
                      f"{_fmt(run['compile_x_baseline'])}; median of {run['repeats']} repeats x {run['steps']} steps "
                      f"after {run['warmup']} warmup; peak memory: {run['mem_kind']}"]

    d = stages.get("bench_data", {}).get("figures", {})
    if d.get("runs"):
        lines += ["", "## 3. Loader: images/s, project vs official PIL + torchvision (same shards, same workers)", ""]
        lines += _table(["project decodes on", "workers", "images", "project images/s", "per core",
                         "official images/s", "x official"],
                        [[r["decode_device"], r["workers"], r["samples"], r["project_images_per_s"],
                          r["project_per_core"], r["official_images_per_s"], r["x_official"]] for r in d["runs"]])

    p = stages.get("pretrain", {}).get("figures", {})
    if p:
        lines += ["", f"## 4. Pretraining run ({p.get('config')}), the trainer's metrics.jsonl", "",
                  f"`{' '.join(p.get('overrides', []))}`", "",
                  f"{p.get('logged_rows')} rows, last step {p.get('last_step')} of {p.get('target_steps')}, "
                  f"loss {_fmt(p.get('first_loss'))} -> {_fmt(p.get('last_loss'))}, wall {p.get('wall_s')} s "
                  f"(start-up, compilation and the final checkpoint included); first logged row's step time "
                  f"{_fmt(p.get('first_row_step_time_s'))} s", ""]
        med = p.get("steady_median", {})
        lines += ["Median over the logged rows after the first:", ""]
        lines += _table(list(med), [[med[k] for k in med]])
        if p.get("rows"):
            lines += ["", "Every logged row ('n/a': the trainer does not write that key):", ""]
            lines += _table(list(METRIC_KEYS), [[row[k] for k in METRIC_KEYS] for row in p["rows"]])
        if p.get("log_lines"):
            lines += ["", "```", *p["log_lines"][:12], "```"]

    pl = stages.get("plan", {}).get("figures", {})
    if pl.get("table"):
        lines += ["", "## 5. mae-scale plan, ViT-H/14 preset, 4 nodes x 8 GPUs", "", pl["table"]]

    tails = [(n, s["tail"]) for n, s in stages.items() if s.get("tail")]
    if tails:
        lines += ["", "## Output of what failed (tail)"]
        for n, tail in tails:
            lines += ["", f"### {n}", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="acceptance.py", description=__doc__.split("\n\n")[0])
    p.add_argument("results_dir", help="where the report (md + json) and a few logs go; created if missing")
    p.add_argument("--cpu", action="store_true", help="toy sizes on a CPU: the rehearsal of this script")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total seconds for all stages (default 480 on a GPU; 715 with --cpu)")
    p.add_argument("--work-dir", default=None, help="shards, the pretraining run, caches (default /tmp/mae_scale_acceptance)")
    p.add_argument("--only", default=",".join(STAGES[1:]),
                   help=f"comma-separated stages to run (default all: {','.join(STAGES[1:])}); env always runs")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = sum(CPU_BUDGETS.values()) + RESERVE_S if args.cpu else 480.0
    if args.budget_s < 60:
        p.error(f"--budget-s {args.budget_s:g} is too small to run anything (at least 60)")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in STAGES]
    if unknown:
        p.error(f"--only: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES[1:])}")
    args.work_dir = args.work_dir or str(Path("/tmp") / "mae_scale_acceptance")
    return args


if __name__ == "__main__":
    sys.exit(Acceptance(parse_args(sys.argv[1:])).main())
