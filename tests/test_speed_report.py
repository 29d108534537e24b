"""Every run reports its own speed (images/s, data wait, model TFLOP/s and MFU, gradient norm,
memory), the trainer's fast paths (prefetch, compile) leave the numbers as they were, and the
divergence guards never let a non-finite step be applied or diverged weights be saved."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ckpt_utils import assert_same_checkpoint, checkpoint_tensors
from run_helpers import base_overrides, run_pretrain
from mae_scale.checkpoint import complete_checkpoints, latest_checkpoint
from mae_scale.models import build_mae, build_vit_classifier
from mae_scale.speed import classifier_train_flops, mae_train_flops, peak_flops, peak_tflops_for


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _hand_block(tokens: int, dim: int, mlp: float) -> float:
    # qkv (3 d^2) + proj (d^2) + two MLP layers (2 mlp d^2), x2 FLOPs per multiply-add; q k^T and a v
    return 2 * tokens * dim * dim * (4 + 2 * mlp) + 4 * tokens * tokens * dim


def test_mae_flops_match_a_hand_count():
    model = build_mae("mae_vit_tiny_patch16", img_size=64)  # 16 patches, width 192, 4 blocks, decoder 128 x 2
    L, D, Dd, pix, keep = 16, 192, 128, 16 * 16 * 3, 4
    enc = 4 * _hand_block(1 + keep, D, 4) + 2 * L * pix * D
    dec = 2 * _hand_block(1 + L, Dd, 4) + 2 * (1 + keep) * D * Dd + 2 * L * Dd * pix
    assert mae_train_flops(model, 8, 0.75) == pytest.approx(3 * 8 * (enc + dec), rel=1e-12)


def test_classifier_flops_count_the_frozen_encoder_once():
    model = build_vit_classifier("vit_tiny_patch16", 10, img_size=64)
    L, D, pix = 16, 192, 16 * 16 * 3
    enc = 4 * _hand_block(1 + L, D, 4) + 2 * L * pix * D
    head = 2 * D * 10
    assert classifier_train_flops(model, 1, frozen_encoder=False) == pytest.approx(3 * (enc + head))
    assert classifier_train_flops(model, 1, frozen_encoder=True) == pytest.approx(enc + 3 * head)


def test_peak_table_by_gpu_name_and_by_hand():
    assert peak_tflops_for("NVIDIA H200") == 989 and peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756 and peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_for("NVIDIA L40S") == 362 and peak_tflops_for("NVIDIA L4") == 121
    assert peak_tflops_for("Some Future GPU") is None
    assert peak_flops(torch.device("cpu")) is None  # no MFU on a CPU unless set by hand
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12


def test_run_reports_speed_and_mfu_agrees_with_the_formula(small_shards, tmp_path):
    out = tmp_path / "run"
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4, "train.peak_tflops": 0.5,
                                                             "train.log_every_steps": 2}))
    assert "TFLOP/s" in proc.stdout and "MFU" in proc.stdout and "data " in proc.stdout
    flops_per_image = mae_train_flops(build_mae("mae_vit_tiny_patch16", img_size=64), 1, 0.75)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["tflops"] == pytest.approx(flops_per_image * 16 / r["step_time_s"] / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5, rel=1e-12)
        assert r["images_per_s"] == pytest.approx(16 / r["step_time_s"], rel=1e-9)
        assert 0 <= r["data_wait_s"] <= r["step_time_s"] and r["data_wait_share"] == pytest.approx(
            r["data_wait_s"] / r["step_time_s"])
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 and r["sync_wait_s"] >= 0
        assert r["mem_allocated_gib"] is None and r["mem_reserved_gib"] is None  # no allocator peak on a CPU
    assert rows[0]["grad_norm"] != rows[1]["grad_norm"]


@pytest.mark.parametrize("stage, precision", [(1, "bf16"), (0, "fp32")])
def test_prefetch_on_or_off_is_bit_for_bit_the_same(small_shards, tmp_path, stage, precision):
    runs = {}
    for prefetch in ("true", "false"):
        out = tmp_path / f"prefetch_{prefetch}"
        run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4, "train.prefetch": prefetch,
                                                          "train.zero_stage": stage, "train.precision": precision}))
        runs[prefetch] = out
    assert [r["loss"] for r in _rows(runs["true"])] == [r["loss"] for r in _rows(runs["false"])]
    assert_same_checkpoint(latest_checkpoint(runs["true"]), latest_checkpoint(runs["false"]))


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(small_shards, tmp_path):
    """torch.compile (inductor's C++ kernels on a CPU) fuses and reorders float operations: the
    losses agree within 1e-4 relative over 4 fp32 steps (measured: about 1e-7), and the checkpoint
    keeps the eager model's parameter names."""
    losses = {}
    for choice in ("true", "false"):
        out = tmp_path / f"compile_{choice}"
        run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4, "train.compile": choice,
                                                          "train.zero_stage": 1, "train.precision": "fp32"}))
        losses[choice] = [r["loss"] for r in _rows(out)]
        names = set(checkpoint_tensors(latest_checkpoint(out)))
        assert not any("_orig_mod" in n for n in names)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


@pytest.mark.parametrize("stage, precision", [(1, "bf16"), (0, "fp32")])
def test_non_finite_gradients_are_never_applied(small_shards, tmp_path, stage, precision):
    """A finite loss whose gradients are NaN (injected at step 3): the run stops in one line, the
    step is not applied, and the newest checkpoint stays the one before it."""
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"train.max_steps": 6, "train.zero_stage": stage,
                                                "train.precision": precision})
    proc = run_pretrain(args, check=False, MAE_SCALE_FAULT="nan_grad:3")
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "gradient norm became" in error[0] and "at step 3" in error[0]
    assert "Traceback" not in proc.stderr
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [2]
    run_pretrain(args)  # the rerun resumes from step 2 and finishes
    assert latest_checkpoint(out).name == "step_00000006"


def test_diverged_weights_are_never_saved(small_shards, tmp_path):
    """A learning rate of 1e30 gives finite but absurd weights one step before the loss turns NaN:
    they are caught before the save, and every checkpoint on disk holds sane weights."""
    out = tmp_path / "run"
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 6, "optim.lr": 1e30,
                                                             "checkpoint.every_steps": 1}), check=False)
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and ("weights diverged" in error[0] or "became" in error[0]), proc.stderr[-2000:]
    for _, ckpt in complete_checkpoints(out / "checkpoints"):
        largest = max(t.float().abs().max().item() for t in checkpoint_tensors(ckpt).values()
                      if t.is_floating_point() and t.numel())
        assert math.isfinite(largest) and largest < 1e6
