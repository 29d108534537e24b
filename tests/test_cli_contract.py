"""The one-line contract of every verb not covered elsewhere (the training configs, make-shards,
data verify and bench data have their own tests): a bad invocation ends with exactly one
`error: ...` line on stderr naming the problem, status 2, no traceback, and nothing created where
nothing should be.

`CASES` run the real CLI (`python -m mae_scale ...`) in subprocesses, a few at a time, in a module
fixture; each parametrized test reads its own result. Each start costs seconds of imports, so
where another row of the same verb already shows a path at the real command line (`IN_PROCESS`),
and for the flags `mae_scale.cli_args` types reject while parsing (`PARSER_CASES`), the case goes
through `main()` in this process instead. `python tests/test_cli_contract.py [WORDS]` prints the
sweep: every row of `CASES` as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_helpers import ROOT, SMOKE, run_env  # noqa: E402

FINETUNE = ROOT / "configs/finetune/fashion_mnist_tiny.yaml"
SIMMIM = ROOT / "configs/pretrain/fashion_mnist_simmim.yaml"
OUT = "{t}/tok.safetensors"
TOK = ["tokenizer", "fit", "{shards}", "--input-size", "32", "--batch-size", "4", "--vocab", "4", "--out", OUT]
BENCH = ["bench", "step", "--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch", "2"]  # small if it ran
PLAN = ["plan", "--config", str(SMOKE), "--gpus-per-node", "1"]  # 1 GPU: the smoke batch divides
FMNIST = ["data", "fashion-mnist", "--quiet"]
SUBMIT = ["submit", "--config", str(SMOKE), "--dry-run", "--partition", "p", "--time", "00:10:00",
          "--gpus-per-node", "0", "output_dir={t}/srun"]
E_OUT = "{t}/e.safetensors"

# (id, argv with {placeholders}, status, paths that must not exist afterwards, words the error holds)
# Status 1 / 0 rows are reports over damaged files: no error line, the words are on stdout.
CASES = [
    ("export: missing source", ["export", "{t}/nope", "--out", E_OUT], 2, [E_OUT], "does not exist"),
    ("export: source is a file", ["export", "{file}", "--out", E_OUT], 2, [E_OUT], "no complete checkpoint"),
    ("export: run dir without checkpoints", ["export", "{empty}", "--out", E_OUT], 2, [E_OUT],
     "no complete checkpoint"),
    ("export: damaged marker", ["export", "{garbage_run}", "--out", "{t}/new/e.safetensors"], 2, ["{t}/new"],
     "COMPLETE cannot be read"),
    ("export: checkpoint without model states", ["export", "{fake_ckpt}", "--out", E_OUT], 2, [E_OUT],
     "mp_rank_00_model_states.pt cannot be read"),
    ("export: --out not .safetensors", ["export", "{fake_ckpt}", "--out", "{t}/e.pt"], 2, ["{t}/e.pt"],
     "must be a .safetensors file"),
    ("export: --out is a directory", ["export", "{fake_ckpt}", "--out", "{adir}"], 2, [], "is a directory"),
    ("export: --out under a file", ["export", "{fake_ckpt}", "--out", "{file}/e.safetensors"], 2, [],
     "is a file, not a folder"),
    ("export: --out unwritable", ["export", "{fake_ckpt}", "--out", "/proc/mae-scale-e.safetensors"], 2, [],
     "cannot write in /proc"),
    ("tokenizer: missing shards", ["tokenizer", "fit", "{t}/nope", "--out", OUT], 2, [OUT], "does not exist"),
    ("tokenizer: empty folder", ["tokenizer", "fit", "{empty}", "--out", OUT], 2, [OUT], "no shard manifest"),
    ("tokenizer: damaged shards", [*TOK[:2], "{bad_shards}", *TOK[3:]], 2, [OUT], "no sample"),
    ("tokenizer: batch larger than the shards", [*TOK, "--batch-size", "64"], 2, [OUT], "batch of 64"),
    ("tokenizer: --vocab 0", [*TOK, "--vocab", "0"], 2, [OUT], "--vocab"),
    ("tokenizer: --vocab 1", [*TOK, "--vocab", "1"], 2, [OUT], "at least 2"),
    ("tokenizer: --vocab beyond the patches", [*TOK, "--vocab", "1000000000"], 2, [OUT], "more than the 32 patches"),
    ("tokenizer: --patch-size 7 vs 32 px", [*TOK, "--patch-size", "7"], 2, [OUT], "not a multiple of --patch-size"),
    ("tokenizer: --out not .safetensors", [*TOK, "--out", "{t}/tok.pt"], 2, ["{t}/tok.pt"], ".safetensors"),
    ("tokenizer: --out under a file", [*TOK, "--out", "{file}/tok.safetensors"], 2, [], "is a file, not a folder"),
    ("tokenizer: --out is a directory", [*TOK, "--out", "{adir}"], 2, [], "is a directory"),
    ("status: missing", ["status", "{t}/nope"], 2, [], "does not exist"),
    ("status: a file", ["status", "{file}"], 2, [], "is a file, not a run directory"),
    ("status: an empty folder", ["status", "{empty}"], 2, [], "is not a run directory"),
    ("status: garbage logs and markers", ["status", "{garbage_run}"], 1, [], "3 unreadable line(s)"),
    ("plan: --gpu-memory-gib nan", [*PLAN, "--gpu-memory-gib", "nan"], 2, [], "finite number above 0"),
    ("plan: missing config", ["plan", "--config", "{t}/nope.yaml"], 2, [], "does not exist"),
    ("plan: bad override", [*PLAN, "model.mask_ratio=2"], 2, [], "model.mask_ratio"),
    ("plan: a SimMIM preset", ["plan", "--config", str(SIMMIM)], 2, [], "simmim preset"),
    ("bench step: --batch 0", [*BENCH, "--batch", "0"], 2, [], "--batch"),
    ("bench step: unknown model", [*BENCH, "--model", "vit_nope"], 2, [], "mae_vit_base_patch16"),
    ("bench step: --img-size 100 (patch 16)", [*BENCH, "--img-size", "100"], 2, [], "patch size 16"),
    ("fashion-mnist: OUT is a file", [*FMNIST, "{file}", "--src", "{idx}"], 2, [], "is a file"),
    ("fashion-mnist: no IDX files", [*FMNIST, "{t}/fm1", "--src", "{t}/nope"], 2, ["{t}/fm1"],
     "dataset-fashion-mnist"),
    ("fashion-mnist: IDX files missing", [*FMNIST, "{t}/fm2", "--src", "{empty}"], 2, ["{t}/fm2"],
     "train-images-idx3-ubyte"),
    ("fashion-mnist: damaged IDX", [*FMNIST, "{t}/fm3", "--src", "{bad_idx}"], 2, ["{t}/fm3"], "not an IDX file"),
    ("fashion-mnist: --samples-per-shard 0", [*FMNIST, "{t}/fm4", "--src", "{idx}", "--samples-per-shard", "0"],
     2, ["{t}/fm4"], "--samples-per-shard"),
    ("submit: --nodes 0", [*SUBMIT, "--nodes", "0"], 2, ["{t}/srun"], "--nodes"),
    ("submit: --time soon", [*SUBMIT, "--time", "soon"], 2, ["{t}/srun"], "HH:MM:SS"),
    ("submit: --time 0", [*SUBMIT, "--time", "0"], 2, ["{t}/srun"], "must be positive"),
    ("submit: --array without values", [*SUBMIT, "--array", "optim.blr"], 2, ["{t}/srun"], "key=v1,v2"),
    ("submit: a config that fails", [*SUBMIT, "model.mask_ratio=2"], 2, ["{t}/srun"], "model.mask_ratio"),
    ("submit: missing config", ["submit", "--config", "{t}/nope.yaml", "--dry-run", "--partition", "p",
                                "--time", "10"], 2, [], "does not exist"),
    ("submit: no --partition", ["submit", "--config", str(SMOKE), "--dry-run", "--time", "10",
                                "output_dir={t}/srun"], 2, ["{t}/srun"], "--partition is required"),
    ("submit: cpus_per_task 0 in a preset", [*SUBMIT, "--cluster", "{zero_cpus}"], 2, ["{t}/srun"],
     "cpus_per_task 0"),
    ("submit: missing --cluster preset", [*SUBMIT, "--cluster", "{t}/nope.yaml"], 2, ["{t}/srun"],
     "does not exist"),
    ("submit: pretrain preset as finetune", [*SUBMIT, "--verb", "finetune"], 2, ["{t}/srun"], "unknown key"),
    ("finetune --eval-only: missing init", ["finetune", "--config", str(FINETUNE), "--eval-only",
                                            "model.init={t}/nope", "data.train_shards={shards}",
                                            "data.val_shards={shards}", "output_dir={t}/ft"], 2, ["{t}/ft"],
     "does not exist"),
    ("config: --kind bad", ["config", "--kind", "bad"], 2, [], "invalid choice"),
    ("no verb", [], 2, [], "required: verb"),
    ("unknown verb", ["frobnicate"], 2, [], "invalid choice"),
]

# Cases whose path the real command line already shows in another row of the same verb (the same
# check, or the same kind of check before any work): run through `main()` in this process, where
# each costs milliseconds instead of seconds. The sweep (`__main__`) runs them as subprocesses too.
IN_PROCESS = {
    "export: source is a file", "export: run dir without checkpoints", "export: --out not .safetensors",
    "export: --out is a directory", "export: --out under a file", "tokenizer: empty folder", "tokenizer: --vocab 0",
    "tokenizer: --vocab 1", "tokenizer: --patch-size 7 vs 32 px", "tokenizer: --out not .safetensors",
    "tokenizer: --out is a directory", "status: missing", "status: a file", "plan: missing config",
    "plan: bad override", "bench step: --batch 0", "fashion-mnist: IDX files missing",
    "fashion-mnist: --samples-per-shard 0", "submit: --nodes 0", "submit: --time 0", "submit: --array without values",
    "submit: missing config", "submit: cpus_per_task 0 in a preset", "submit: missing --cluster preset",
    "submit: pretrain preset as finetune", "no verb",
}
CLI_CASES = [c for c in CASES if c[0] not in IN_PROCESS]
MAIN_CASES = [c for c in CASES if c[0] in IN_PROCESS]

# Flags the shared `type=` helpers refuse while parsing (see the module docstring): argv, flag named.
PARSER_CASES = [
    ([*TOK, "--vocab", "-3"], "--vocab"), ([*TOK, "--patch-size", "0"], "--patch-size"),
    ([*TOK, "--max-images", "0"], "--max-images"), ([*TOK, "--batch-size", "0"], "--batch-size"),
    ([*TOK, "--epochs", "0"], "--epochs"), ([*TOK, "--workers", "-1"], "--workers"),
    ([*TOK, "--input-size", "0"], "--input-size"),
    ([*PLAN, "--nodes", "0"], "--nodes"), ([*PLAN, "--micro-batch", "-1"], "--micro-batch"),
    ([*PLAN, "--gpus-per-node", "x"], "--gpus-per-node"), ([*PLAN, "--gpu-memory-gib", "inf"], "--gpu-memory-gib"),
    ([*BENCH, "--batch", "-4"], "--batch"), ([*BENCH, "--img-size", "0"], "--img-size"),
    ([*BENCH, "--steps", "0"], "--steps"), ([*BENCH, "--repeats", "0"], "--repeats"),
    ([*BENCH, "--warmup", "-1"], "--warmup"), ([*BENCH, "--precision", "fp16"], "--precision"),
    ([*FMNIST, "{t}/fm", "--train-limit", "-1"], "--train-limit"),
    ([*FMNIST, "{t}/fm", "--val-limit", "0"], "--val-limit"),
    ([*SUBMIT, "--cpus-per-task", "0"], "--cpus-per-task"), ([*SUBMIT, "--signal-delay-s", "-5"], "--signal-delay-s"),
    ([*SUBMIT, "--gpus-per-node", "-1"], "--gpus-per-node"), ([*SUBMIT, "--tasks-per-node", "0"], "--tasks-per-node"),
    (["pretrain"], "--config"), (["export", "{t}/run"], "--out"),
]


def make_fixtures(root: Path) -> dict[str, str]:
    """Small real inputs and damaged copies of them, under `root`."""
    from data_pipeline import make_sample_folder, write_shards
    from digits_data import write_digits_idx

    make_sample_folder(root / "images", n_images=8, seed=0, min_side=64, max_side=96)
    write_shards(root / "images", root / "shards", samples_per_shard=4, seed=0, progress=False)
    bad = root / "bad_shards"
    write_shards(root / "images", bad, samples_per_shard=4, seed=0, progress=False)
    for tar in bad.glob("*.tar"):
        tar.write_bytes(b"\x00not a tar" * 300)  # every shard unreadable
    (root / "empty").mkdir()
    (root / "adir.safetensors").mkdir()
    (root / "notes.txt").write_text("not a run, a checkpoint or a folder\n")
    (root / "zero_cpus.yaml").write_text("cpus_per_task: 0\n")
    # A run directory whose logs and checkpoint markers are garbage.
    run = root / "garbage_run"
    (run / "checkpoints/step_00000002").mkdir(parents=True)
    (run / "checkpoints/step_00000002/COMPLETE").write_text("{not json")
    (run / "checkpoints/step_00000001").mkdir()
    (run / "checkpoints/step_00000001/COMPLETE").write_text("[]")  # JSON, but not a marker
    (run / "config.yaml").write_text("output_dir: x\n")
    (run / "attempts.jsonl").write_bytes(b'\xff\xfe garbage\n[1, 2]\n"text"\n{"time": "t", "world_size": 1}\n')
    (run / ".lock").write_text("[1, 2]")
    (run / "result.json").write_text("[3]")
    # A checkpoint whose marker checks out (it lists no files) but has no model states: the
    # export's --out checks are made before it is read.
    fake = root / "fake_run/checkpoints/step_00000001"
    fake.mkdir(parents=True)
    (fake / "COMPLETE").write_text('{"step": 1, "world_size": 1, "zero_stage": 0, "files": {}}')
    (root / "idx").mkdir()
    write_digits_idx(root / "idx", 40, 20)
    (root / "bad_idx").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (root / "bad_idx" / name).write_bytes(b"garbage, not IDX")
    return {"t": str(root), "shards": str(root / "shards"), "bad_shards": str(bad), "empty": str(root / "empty"),
            "adir": str(root / "adir.safetensors"), "file": str(root / "notes.txt"), "garbage_run": str(run),
            "fake_ckpt": str(fake), "idx": str(root / "idx"), "bad_idx": str(root / "bad_idx"),
            "zero_cpus": str(root / "zero_cpus.yaml")}


def run_case(case, fx: dict[str, str], timeout: float = 120) -> dict:
    args = [a.format(**fx) for a in case[1]]
    # MAE_SCALE_TRACEBACK=1: an unanticipated crash prints its traceback (instead of one
    # "error: unexpected ..." line and a file), so a crash can never pass for a refusal.
    try:
        proc = subprocess.run([sys.executable, "-m", "mae_scale", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=timeout, env=run_env(MAE_SCALE_TRACEBACK="1"))
    except subprocess.TimeoutExpired:  # it went to work on bad input
        return {"code": f"still running after {timeout} s", "stderr": "", "stdout": "", "lines": [],
                "traceback": False}
    # The data pipeline's warnings (a shard skipped on the way) may come before the one error line.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("skipping shard ")]
    return {"code": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout, "lines": lines,
            "traceback": "Traceback" in proc.stderr}


def run_all(fx: dict[str, str], cases=CASES, workers: int = 3) -> dict[str, dict]:
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((c[0] for c in cases), pool.map(lambda c: run_case(c, fx), cases)))


def problems(case, r: dict, fx: dict[str, str]) -> list[str]:
    """What breaks the contract in result `r` of `case` (empty: kept)."""
    _, _, code, absent, words = case
    out = []
    if r["traceback"] or r["code"] != code:
        out.append(f"status {r['code']} (want {code}){', traceback' if r['traceback'] else ''}")
    if code == 2:
        if len(r["lines"]) != 1 or not r["lines"][0].startswith("error: ") or "unexpected" in r["lines"][0]:
            out.append(f"{len(r['lines'])} stderr lines, want one `error:` line")
        elif words not in r["lines"][0]:
            out.append(f"the error does not say {words!r}")
    elif r["lines"] or words not in r["stdout"]:
        out.append(f"stderr not empty, or stdout does not say {words!r}")
    out += [f"{p} was created" for p in absent if Path(p.format(**fx)).exists()]
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    return make_fixtures(tmp_path_factory.mktemp("cli_contract"))


@pytest.fixture(scope="module")
def results(fixtures):
    return run_all(fixtures, CLI_CASES)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line(fixtures, results, case):
    r = results[case[0]]
    assert not problems(case, r, fixtures), (problems(case, r, fixtures), r["stderr"][-3000:], r["stdout"][-1000:])


@pytest.mark.parametrize("case", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_bad_input_is_one_line_in_process(fixtures, case, capsys):
    from mae_scale.cli import main

    try:  # main() returns the status of a verb's refusal; argparse's refusals exit
        code = main([a.format(**fixtures) for a in case[1]])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    r = {"code": code, "stdout": captured.out, "lines": lines, "traceback": False}
    assert not problems(case, r, fixtures), (problems(case, r, fixtures), captured.err)


@pytest.mark.parametrize("argv, flag", PARSER_CASES, ids=[" ".join(a[:2] + a[-2:]) for a, _ in PARSER_CASES])
def test_refused_while_parsing(argv, flag, tmp_path, capsys):
    from mae_scale.cli import main

    with pytest.raises(SystemExit) as stop:
        main([a.format(t=tmp_path, shards=tmp_path, idx=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_eval_only_refuses_a_pretraining_encoder(tmp_path):
    """--eval-only on weights without a trained head: WeightsError (the CLI's status 2) before the
    model moves to a device or anything is written (here in-process: the CLI starts DeepSpeed first)."""
    from safetensors.torch import save_file

    from data_pipeline import make_sample_folder, write_shards
    from mae_scale.train.classify import build_classifier, evaluate_only
    from mae_scale.finetune_config import load_finetune_config
    from mae_scale.weights import WeightsError

    make_sample_folder(tmp_path / "images", n_images=4, seed=0, min_side=64, max_side=96)
    shards = tmp_path / "shards"
    write_shards(tmp_path / "images", shards, samples_per_shard=4, progress=False)
    data = [f"data.train_shards={shards}", f"data.val_shards={shards}", f"output_dir={tmp_path / 'ft'}"]
    cfg = load_finetune_config(FINETUNE, ["model.init=", *data, "train.global_batch_size=4", "train.micro_batch_size=2"],
                               mode="finetune")  # a training config, only to build the model
    encoder = {k: v for k, v in build_classifier(cfg).state_dict().items() if not k.startswith(("head", "fc_norm"))}
    save_file(encoder, str(tmp_path / "encoder.safetensors"))
    cfg = load_finetune_config(FINETUNE, [f"model.init={tmp_path / 'encoder.safetensors'}", *data],
                               mode="finetune", eval_only=True)
    with pytest.raises(WeightsError, match="no trained") as err:
        evaluate_only(cfg, env=None)  # refused before the environment is used
    assert "\n" not in str(err.value) and not (tmp_path / "ft").exists()


if __name__ == "__main__":  # the sweep: every subprocess case, one row each
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fx = make_fixtures(Path(tmp))
        only = [c for c in CASES if not sys.argv[1:] or any(w in c[0] for w in sys.argv[1:])]
        got = run_all(fx, only, workers=int(os.environ.get("SWEEP_WORKERS", "3")))
        for case in only:
            r, bad = got[case[0]], problems(case, got[case[0]], fx)
            last = (r["lines"][-1] if r["lines"] else r["stdout"].strip().splitlines()[-1:] or [""])
            last = last if isinstance(last, str) else last[0]
            print(f"{'FAIL' if bad else 'ok  '} | {case[0]} | {r['code']} | {'; '.join(bad)} | {last[:140]}")
