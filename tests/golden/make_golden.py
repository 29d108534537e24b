"""Record the golden results of today's code: short real runs through the CLI, and one checkpoint.

Why: the code is about to be restructured (objectives, a train/ package with one Loop, checkpoint/
and tokenizers/ packages) without changing a single number. These records are what "without
changing a number" is checked against (tests/test_golden_runs.py):

* golden.json: per run (MAE, SimMIM, BEiT-style with a k-means tokenizer, fine-tune and linear
  probe from the MAE run) the CLI overrides, the loss of every step (metrics.jsonl), the final
  evaluation (fine-tune, probe), and the final weights: a sha256 over the consolidated fp32 state
  dict (`mae_scale.checkpoint.consolidate`, keys sorted) for the bitwise check, and per-tensor sum /
  L1 / L2 for a tolerance check on another machine; plus the environment the numbers belong to.
* mae_ckpt/: the MAE run made by today's code, stopped at step 7 of 14 (config.yaml,
  checkpoints/step_00000007/ with its COMPLETE marker, metrics.jsonl). A later version of the
  code must resume it and end where the uninterrupted run ended (golden.json "mae_resume").

Usage, from the repository root, with the venv active (about a minute on 2 cores):

    python tests/golden/make_golden.py            # rewrite golden.json and mae_ckpt/
    python tests/golden/make_golden.py --check    # rerun everything and compare, write nothing

Regenerate only when a change is meant to change the numbers (see README.md here), never as part
of a refactor. Everything is deterministic: one OpenMP thread, fixed seeds (train.seed=0, the
tokenizer's --seed 0), MLflow off, CPU only, data made from images packaged with scikit-learn,
exactly as the test fixture `digits_shards` (tests/conftest.py) makes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
# The code of the tree this script lives in, not whatever checkout the venv's editable install
# points at (the CLI subprocesses get it the same way: cwd=ROOT with `python -m`).
sys.path[:0] = [str(ROOT), str(TESTS)]
GOLDEN_JSON = HERE / "golden.json"
CKPT_DIR = HERE / "mae_ckpt"

PRETRAIN = "configs/pretrain/fashion_mnist_tiny.yaml"
SIMMIM = "configs/pretrain/simmim_vit_base_patch16_800ep.yaml"
BEIT = "configs/pretrain/beit_vit_base_patch16_800ep.yaml"
FINETUNE = "configs/finetune/fashion_mnist_tiny.yaml"
LINPROBE = "configs/linprobe/fashion_mnist_tiny.yaml"

# The MAE run: 1500 digits at global batch 128 give 11 steps per epoch, so the 14 steps cross an
# epoch boundary and the checkpoint at step 7 is in the middle of epoch 0 (the resume must skip
# to its position in the epoch's data). Micro-batch 64 = two accumulated micro-batches per step.
MAE_STEPS, MAE_CKPT_STEP = 14, 7

# {data}: the digits shards folder, {out}: this run's directory, {tok}: the tokenizer file,
# {mae}: the MAE run directory (fine-tune and probe start from it). Written into golden.json as
# they are, so a test fills them in for its own temporary paths.
# The pretraining runs were recorded before optim.no_weight_decay existed, when every token and position
# embedding was spared weight decay: they keep that rule (today's presets decay some of them).
EARLIER_NO_WEIGHT_DECAY = "optim.no_weight_decay=[cls_token,mask_token,pos_embed,decoder_pos_embed,dist_token,reg_token]"
_PRE_COMMON = ["data.input_size=16", "data.num_workers=0", "train.log_every_steps=1", "tracking.enabled=false",
               "train.seed=0", EARLIER_NO_WEIGHT_DECAY]
RUNS: dict[str, dict] = {
    "mae": {
        "verb": "pretrain", "config": PRETRAIN, "args": [],
        "overrides": ["output_dir={out}", "data.train_shards={data}/train/manifest.json", *_PRE_COMMON,
                      "train.global_batch_size=128", "train.micro_batch_size=64", "train.epochs=2",
                      "train.warmup_epochs=0.2", f"train.max_steps={MAE_STEPS}", "train.precision=fp32",
                      "train.zero_stage=1", f"checkpoint.every_steps={MAE_CKPT_STEP}", "checkpoint.keep_last=2"],
    },
    # SimMIM in bf16 at ZeRO-2 (DeepSpeed's bf16 optimizer, partitioned gradients), drop path on.
    "simmim": {
        "verb": "pretrain", "config": SIMMIM, "args": [],
        "overrides": ["output_dir={out}", "model.name=vit_tiny_patch4", "data.train_shards={data}/train/manifest.json",
                      *_PRE_COMMON, "train.global_batch_size=32", "train.micro_batch_size=16", "train.max_steps=6",
                      "train.precision=bf16", "train.zero_stage=2", "checkpoint.every_steps=100",
                      "model.mask_patch_size=8"],
    },
    # BEiT-style targets from the k-means tokenizer fitted below; blockwise masks, drop path on.
    "beit": {
        "verb": "pretrain", "config": BEIT, "args": [],
        "overrides": ["output_dir={out}", "model.name=vit_tiny_patch4", "data.train_shards={data}/train/manifest.json",
                      *_PRE_COMMON, "train.global_batch_size=32", "train.micro_batch_size=16", "train.max_steps=6",
                      "train.precision=fp32", "train.zero_stage=1", "checkpoint.every_steps=100",
                      "model.tokenizer={tok}", "model.num_masking_patches=6", "model.min_block_patches=2"],
    },
    # Fine-tuning from the MAE run with every random draw of a step on: Mixup/CutMix, RandAugment,
    # random erasing (the preset's 0.25), drop path (the preset's 0.1); evaluated at the end.
    "finetune": {
        "verb": "finetune", "config": FINETUNE, "args": [],
        "overrides": ["output_dir={out}", "model.init={mae}", "data.train_shards={data}/train/manifest.json",
                      "data.val_shards={data}/val/manifest.json", "data.input_size=16", "data.num_workers=0",
                      "data.eval_batch_size=100", "data.mixup=0.8", "data.cutmix=1.0",
                      "data.auto_augment=rand-m9-mstd0.5-inc1", "train.global_batch_size=64",
                      "train.micro_batch_size=32", "train.epochs=1", "train.warmup_epochs=0.1", "train.max_steps=6",
                      "train.log_every_steps=1", "train.seed=0", "checkpoint.every_steps=100",
                      "tracking.enabled=false"],
    },
    "linprobe": {
        "verb": "linprobe", "config": LINPROBE, "args": [],
        "overrides": ["output_dir={out}", "model.init={mae}", "data.train_shards={data}/train/manifest.json",
                      "data.val_shards={data}/val/manifest.json", "data.input_size=16", "data.num_workers=0",
                      "data.eval_batch_size=100", "optim.blr=0.1", "train.global_batch_size=64",
                      "train.micro_batch_size=32", "train.epochs=1", "train.warmup_epochs=0.1", "train.max_steps=6",
                      "train.log_every_steps=1", "train.seed=0", "checkpoint.every_steps=100",
                      "tracking.enabled=false"],
    },
}
TOKENIZER_ARGS = ["tokenizer", "fit", "{data}/train/manifest.json", "--vocab", "16", "--out", "{tok}",
                  "--input-size", "16", "--patch-size", "4", "--max-images", "256", "--seed", "0"]
# What the committed run directory keeps: what a resume reads. Pictures, the loss curve, the lock,
# attempts.jsonl, result.json and DeepSpeed's zero_to_*.py scripts are outputs only.
CKPT_KEEP = ("config.yaml", "metrics.jsonl", "checkpoints")
# CPU flags that decide which kernels oneDNN / ATen pick (and so the last bits of a result).
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")


# -- data: the same shards the digits_shards fixture makes ----------------------------------------

def make_digits_shards(root: Path) -> Path:
    """scikit-learn's digits as shards, 1500 train / 297 val, exactly like tests/conftest.py's
    `digits_shards` (the test regenerates them the same way, so the golden numbers apply)."""
    from data_pipeline import write_fashion_mnist_shards
    from digits_data import write_digits_idx

    (root / "idx").mkdir(parents=True)
    write_digits_idx(root / "idx", 1500, 297)
    write_fashion_mnist_shards(root / "shards", src_dir=root / "idx", samples_per_shard=400, progress=False)
    return root / "shards"


def shard_hashes(shards: Path) -> dict[str, str]:
    """{split/file: sha256} of every shard: if the images came out differently (another Pillow or
    scikit-learn), the golden numbers do not apply and the test says so instead of a loss mismatch."""
    return {str(p.relative_to(shards)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(shards.rglob("*.tar"))}


# -- running the CLI -------------------------------------------------------------------------------

def run_env() -> dict:
    import os

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # bitwise results depend on the thread count
    env["MKL_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU record: on a GPU machine the runs must still run on the CPU
    env.pop("MAE_SCALE_FAULT", None)  # fault injection of the resume tests must never leak in
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def fill(items: list[str], paths: dict[str, Path]) -> list[str]:
    return [item.format(**{k: str(v) for k, v in paths.items()}) for item in items]


def cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mae_scale", *args], capture_output=True, text=True,
                          timeout=timeout, env=run_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"mae-scale {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    return proc


def run_cmd(name: str, paths: dict[str, Path], **override: str) -> list[str]:
    """The CLI arguments of golden run `name`; `override` replaces single keys (max_steps...)."""
    spec = RUNS[name]
    overrides = fill(spec["overrides"], paths)
    for key, value in override.items():
        overrides = [o for o in overrides if not o.startswith(f"{key}=")] + [f"{key}={value}"]
    return [spec["verb"], "--config", str(ROOT / spec["config"]), *spec["args"], *overrides]


def fit_tokenizer(paths: dict[str, Path]) -> None:
    cli(fill(TOKENIZER_ARGS, paths))


# -- what is recorded ------------------------------------------------------------------------------

def step_losses(run_dir: Path) -> list[list]:
    """[[step, loss], ...] from metrics.jsonl (log_every_steps=1: every step; JSON floats round-trip exactly)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["step"], r["loss"]] for r in rows]


def eval_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return []
    keep = ("step", "acc1", "acc5", "loss", "samples")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, path.read_text().splitlines())]


def weights_record(run_or_ckpt: Path) -> dict:
    """sha256 over the consolidated fp32 state dict (sorted keys: name, dtype, shape, bytes), and
    per tensor [sum, L1, L2] in float64 for a comparison with a tolerance."""
    import torch

    from mae_scale.checkpoint import consolidate

    state, info = consolidate(run_or_ckpt)
    digest = hashlib.sha256()
    tensors = {}
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(key.encode() + b"\0" + str(t.dtype).encode() + b"\0" + str(tuple(t.shape)).encode() + b"\0")
        digest.update(t.numpy().tobytes())
        d = t.double()
        tensors[key] = [d.sum().item(), d.abs().sum().item(), torch.linalg.vector_norm(d).item()]
    return {"step": info["step"], "sha256": digest.hexdigest(), "tensors": tensors}


def tokenizer_record(path: Path) -> dict:
    """The fitted codebook's sha256 and the file's metadata. Not a hash of the file: safetensors
    writes the metadata in hash-map order, which changes from one process to the next (measured:
    three fits, identical codebooks, three different file hashes)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        codebook = f.get_tensor("codebook").contiguous()
        metadata = dict(sorted((f.metadata() or {}).items()))
    return {"codebook_sha256": hashlib.sha256(codebook.numpy().tobytes()).hexdigest(),
            "codebook_shape": list(codebook.shape), "metadata": metadata}


def cpu_facts() -> dict:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_isa_flags": sorted(f for f in ISA_FLAGS if f in flags)}


def environment() -> dict:
    import deepspeed
    import numpy
    import PIL
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "numpy": numpy.__version__,
            "pillow": PIL.__version__, "python": platform.python_version(), "machine": platform.machine(),
            **cpu_facts(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "omp_num_threads": 1}


def same_machine(recorded: dict) -> bool:
    """Bitwise equality is promised for the same torch on the same kind of CPU: the model name alone
    is not enough (cloud vCPUs are often just "Intel Xeon Processor"), so the ISA flags count too."""
    now = environment()
    return all(recorded.get(k) == now[k] for k in ("torch", "cpu_model", "cpu_isa_flags", "torch_cpu_capability"))


def record_run(run_dir: Path, name: str) -> dict:
    return {"verb": RUNS[name]["verb"], "config": RUNS[name]["config"], "overrides": RUNS[name]["overrides"],
            "losses": step_losses(run_dir), "eval": eval_rows(run_dir), "weights": weights_record(run_dir)}


# -- the whole record -------------------------------------------------------------------------------

def make_all(work: Path) -> tuple[dict, Path]:
    """Run everything under `work`; return (golden record, the step-7 MAE run directory to commit)."""
    import torch

    from ckpt_utils import checkpoint_tensors

    data = make_digits_shards(work / "digits")
    paths = {"data": data, "tok": work / "tok.safetensors", "mae": work / "mae"}
    fit_tokenizer(paths)
    golden = {"environment": environment(), "data": shard_hashes(data),
              "tokenizer": {"args": TOKENIZER_ARGS, **tokenizer_record(paths["tok"])},
              "runs": {}}
    for name in RUNS:
        out = work / name
        cli(run_cmd(name, {**paths, "out": out}))
        golden["runs"][name] = record_run(out, name)

    # The checkpoint to commit: the same MAE command stopped at step 7 (train.max_steps is a SAFE
    # resume key: the run continues to 14 when started again with the golden command).
    half = work / "mae_half"
    cli(run_cmd("mae", {**paths, "out": half}, **{"train.max_steps": MAE_CKPT_STEP}))
    ckpt = half / "checkpoints" / f"step_{MAE_CKPT_STEP:08d}"
    # It must be the uninterrupted run's step-7 checkpoint, bit for bit (what max_steps must not change).
    straight, stopped = checkpoint_tensors(work / "mae/checkpoints" / ckpt.name), checkpoint_tensors(ckpt)
    assert straight.keys() == stopped.keys() and all(torch.equal(straight[k], stopped[k]) for k in straight), \
        "stopping at step 7 changed the step-7 checkpoint"
    # ... and today's code must resume it exactly: the continuation recorded is then the one the
    # new code has to reproduce.
    resumed = work / "mae_resumed"
    shutil.copytree(half, resumed)
    proc = cli(run_cmd("mae", {**paths, "out": resumed}))
    assert "resumed from" in proc.stdout, proc.stdout[-2000:]
    mae = golden["runs"]["mae"]
    assert step_losses(resumed) == mae["losses"], "today's code does not resume its own MAE run exactly"
    assert weights_record(resumed)["sha256"] == mae["weights"]["sha256"]
    golden["mae_resume"] = {
        "checkpoint": f"mae_ckpt/checkpoints/{ckpt.name}", "resume_step": MAE_CKPT_STEP, "end_step": MAE_STEPS,
        "continuation_losses": [row for row in mae["losses"] if row[0] > MAE_CKPT_STEP],
        "final_sha256": mae["weights"]["sha256"],
    }
    return golden, half


def copy_resumable(run_dir: Path, dst: Path) -> None:
    """The run directory minus what a resume does not read (only the checkpoint to resume from)."""
    dst.mkdir(parents=True)
    for name in CKPT_KEEP:
        src = run_dir / name
        if name == "checkpoints":  # the step folders; not DeepSpeed's zero_to_*.py helper scripts beside them
            for step_dir in sorted(src.glob("step_*")):
                shutil.copytree(step_dir, dst / name / step_dir.name)
        else:
            shutil.copy2(src, dst / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rerun and compare with golden.json; write nothing")
    parser.add_argument("--out", type=Path, default=GOLDEN_JSON,
                        help="where to write the record (default: golden.json here; the checkpoint is written "
                             "to mae_ckpt/ here only when this is the default)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the float64 sums of weights_record, reduced the same way every time
    work_ctx = tempfile.TemporaryDirectory(prefix="golden-") if args.keep is None else None
    work = Path(work_ctx.name) if work_ctx else args.keep
    try:
        golden, half = make_all(work)
        if args.check:
            old = json.loads(GOLDEN_JSON.read_text())
            diff = [k for k in ("data", "tokenizer", "runs", "mae_resume") if old.get(k) != golden.get(k)]
            print("identical to golden.json" if not diff else f"DIFFERENT from golden.json: {diff}")
            return 1 if diff else 0
        if args.out.resolve() == GOLDEN_JSON:
            if CKPT_DIR.exists():
                shutil.rmtree(CKPT_DIR)
            copy_resumable(half, CKPT_DIR)
        args.out.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {args.out}" + (f" and {CKPT_DIR}" if args.out.resolve() == GOLDEN_JSON else ""))
        return 0
    finally:
        if work_ctx:
            work_ctx.cleanup()


if __name__ == "__main__":
    sys.exit(main())
