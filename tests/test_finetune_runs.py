"""Fine-tuning and linear probing end to end on real labelled images (scikit-learn's digits as
shards): from a real MAE pretraining run, at world size 1 and 2 under ZeRO, with evaluation over
every validation sample once, exact resume, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ckpt_utils import assert_same_checkpoint
from run_helpers import ROOT, run_env
from mae_scale.checkpoint import latest_checkpoint

FT = ROOT / "configs/finetune/fashion_mnist_tiny.yaml"
LP = ROOT / "configs/linprobe/fashion_mnist_tiny.yaml"
PRE = ROOT / "configs/pretrain/fashion_mnist_tiny.yaml"
N_VAL = 297


def tiny(shards, out, **extra) -> list[str]:
    """The 8 px digits as they are, global batch 64, two epochs of 23 steps, checkpoints every 10 steps,
    no MLflow; a high LR so that two epochs learn something measurable."""
    values = {
        "output_dir": out, "model.init": "", "data.train_shards": shards / "train/manifest.json",
        "data.val_shards": shards / "val/manifest.json", "data.input_size": 8, "data.num_workers": 0,
        "data.eval_batch_size": 40, "optim.blr": 1e-2, "train.global_batch_size": 64, "train.micro_batch_size": 32, "train.epochs": 2,
        "train.log_every_steps": 5, "train.warmup_epochs": 0.3, "train.eval_every_epochs": 1,
        "checkpoint.every_steps": 10,
        "tracking.enabled": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def mae_scale(verb: str, config, overrides: list[str], nproc: int = 1, check: bool = True,
              extra_args: tuple = ()) -> subprocess.CompletedProcess:
    args = [verb, "--config", str(config), *extra_args, *overrides]
    cmd = [sys.executable, "-m", "mae_scale", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "mae_scale",
        *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=run_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{verb} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def eval_rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(digits_shards, tmp_path_factory):
    """A real (short) MAE pretraining run on the digits' train images."""
    out = tmp_path_factory.mktemp("pre") / "mae"
    overrides = [f"output_dir={out}", f"data.train_shards={digits_shards / 'train/manifest.json'}",
                 "data.input_size=8", "data.num_workers=0", "train.global_batch_size=64",
                 "train.micro_batch_size=32", "train.max_steps=6", "train.log_every_steps=3",
                 "tracking.enabled=false"]
    proc = subprocess.run([sys.executable, "-m", "mae_scale", "pretrain", "--config", str(PRE), *overrides],
                          capture_output=True, text=True, timeout=600, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_finetune_from_mae_run_trains_evaluates_and_records(digits_shards, pretrained, tmp_path):
    out = tmp_path / "ft"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = mae_scale("finetune", FT, tiny(digits_shards, out, **{
        "model.init": pretrained, "tracking.enabled": "true", "tracking.tracking_uri": store}))
    assert f"initialized from {pretrained}" in proc.stdout
    rows = eval_rows(out)
    assert [r["step"] for r in rows] == [23, 46]  # each epoch's end
    assert all(r["samples"] == N_VAL and r["bad_samples"] == 0 for r in rows)
    result = json.loads((out / "result.json").read_text())
    assert result["best_acc1"] == max(r["acc1"] for r in rows) and result["last_acc1"] == rows[-1]["acc1"]
    assert result["last_acc1"] > 30.0  # 10 classes: chance is 10 %; two short epochs already learn
    # MLflow holds the evaluations against the step, and the run's params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    history = client.get_metric_history(result["mlflow_run_id"], "val_acc1")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["acc1"]) for r in rows]
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["mode"] == "finetune" and run.data.params["optim.layer_decay"] == "0.75"
    assert run.info.status == "FINISHED"
    # fine-tuning reports its speed as pretraining does, with the classifier's FLOPs
    from mae_scale.models import build_vit_classifier
    from mae_scale.speed import classifier_train_flops

    flops = classifier_train_flops(build_vit_classifier("vit_tiny_patch4", 10, img_size=8), 1, frozen_encoder=False)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tflops"] == pytest.approx(flops * 64 / r["step_time_s"] / 1e12, rel=1e-9) for r in steps)
    assert all(r["grad_norm"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in steps)
    assert {"tflops", "grad_norm", "data_wait_share"} <= set(run.data.metrics)
    # --eval-only on the fine-tuned run reproduces its last evaluation
    proc = mae_scale("finetune", FT, tiny(digits_shards, tmp_path / "ev", **{"model.init": out}),
                     extra_args=("--eval-only",))
    ev = json.loads((tmp_path / "ev/eval_only.json").read_text())
    assert ev["samples"] == N_VAL
    assert ev["acc1"] == pytest.approx(rows[-1]["acc1"]) and ev["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4)


def test_linprobe_keeps_the_encoder_frozen_and_learns_a_head(digits_shards, pretrained, tmp_path):
    from mae_scale.checkpoint import consolidate

    out = tmp_path / "lp"
    mae_scale("linprobe", LP, tiny(digits_shards, out, **{"model.init": pretrained, "optim.blr": 0.1}))
    rows = eval_rows(out)
    assert len(rows) == 2 and rows[-1]["acc1"] > 20.0
    probed, _ = consolidate(out)
    pre, _ = consolidate(pretrained)
    for key in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.bias", "norm.weight", "patch_embed.proj.weight"):
        assert torch.equal(probed[key], pre[key]), key  # the encoder did not move


@pytest.mark.distributed
def test_world2_zero3_finetune_resumes_exactly_and_counts_every_sample_once(digits_shards, tmp_path):
    # eval batch 37: rank 0 has 149 samples (5 batches), rank 1 148 (4): ZeRO-3 keeps both forwarding
    extra = {"train.zero_stage": 3, "data.eval_batch_size": 37, "train.epochs": 1, "data.mixup": 0.8,
             "data.cutmix": 1.0, "data.auto_augment": "rand-m9-mstd0.5-inc1", "checkpoint.every_steps": 4}
    straight = tmp_path / "straight"
    mae_scale("finetune", FT, tiny(digits_shards, straight, **{**extra, "train.max_steps": 8}), nproc=2)
    out = tmp_path / "resumed"
    mae_scale("finetune", FT, tiny(digits_shards, out, **{**extra, "train.max_steps": 4}), nproc=2)
    proc = mae_scale("finetune", FT, tiny(digits_shards, out, **{**extra, "train.max_steps": 8}), nproc=2)
    assert "resumed from" in proc.stdout
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight))
    rows = eval_rows(straight)
    assert rows[-1]["samples"] == N_VAL
    # the same weights evaluated at world size 1: the same figures
    ev = mae_scale("finetune", FT, tiny(digits_shards, tmp_path / "ev", **{"model.init": straight}),
                   extra_args=("--eval-only",))
    one = json.loads((tmp_path / "ev/eval_only.json").read_text())
    assert one["samples"] == N_VAL and one["acc1"] == pytest.approx(rows[-1]["acc1"])
    assert one["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4), ev.stdout


def test_submit_runs_the_finetune_verb_on_slurm(digits_shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mae_scale", "submit", "--verb", "finetune", "--config", str(FT),
                           "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--partition", "debug",
                           "--time", "00:10:00", "--dry-run", *tiny(digits_shards, tmp_path / "ft")],
                          capture_output=True, text=True, timeout=120, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "each task runs: mae-scale finetune --config" in proc.stdout and "world size 2" in proc.stdout


def test_refusals_are_one_line_and_before_any_work(digits_shards, small_shards, tmp_path):
    # a linear-probe preset given to the finetune verb
    proc = mae_scale("finetune", LP, tiny(digits_shards, tmp_path / "a"), check=False)
    assert proc.returncode == 2 and "linprobe preset" in proc.stderr and not (tmp_path / "a").exists()
    # --eval-only without weights
    proc = mae_scale("finetune", FT, tiny(digits_shards, tmp_path / "b", **{"model.init": ""}), check=False,
                     extra_args=("--eval-only",))
    assert proc.returncode == 2 and "model.init" in proc.stderr.strip().splitlines()[-1]
    # weights of another architecture
    other = tmp_path / "vit_b.pth"
    from mae_scale.models import build_mae

    with torch.device("meta"):
        shapes = build_mae("mae_vit_tiny_patch16").state_dict()
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in shapes.items()}}, other)
    proc = mae_scale("finetune", FT, tiny(digits_shards, tmp_path / "c", **{"model.init": other}), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error:") and "cls_token" in last and "(1, 1, 192)" in last, last


def test_eval_only_refuses_a_model_without_a_trained_head(digits_shards, pretrained, tmp_path):
    proc = mae_scale("finetune", FT, [f"model.init={pretrained}", f"output_dir={tmp_path / 'ev'}",
                                      f"data.val_shards={digits_shards / 'val/manifest.json'}",
                                      "data.input_size=8", "data.num_workers=0", "tracking.enabled=false"],
                     check=False, extra_args=("--eval-only",))  # no data.train_shards needed to evaluate
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "no trained fc_norm.weight" in last, proc.stderr[-2000:]
