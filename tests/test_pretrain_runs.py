"""Real pretraining runs: plain python at world size 1 and torchrun (gloo) at world size 2, under
each ZeRO stage; what a run leaves behind (checkpoint, config, pictures, metrics)."""

import json

import pytest
from PIL import Image

from run_helpers import base_overrides, run_pretrain
from mae_scale.checkpoint import latest_checkpoint, read_marker
from mae_scale.optim import cosine_lr


@pytest.mark.distributed
@pytest.mark.parametrize("stage, nproc", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)])
def test_zero_stage_trains(small_shards, tmp_path, stage, nproc):
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **{"train.zero_stage": stage, "train.max_steps": 3}), nproc=nproc)
    ckpt = latest_checkpoint(out)
    marker = read_marker(ckpt)
    assert marker["step"] == 3 and marker["world_size"] == nproc and marker["zero_stage"] == stage
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["world_size"] == nproc


def test_run_leaves_config_picture_curve_and_follows_schedule(small_shards, tmp_path):
    out = tmp_path / "run"
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.epochs": 2, "train.zero_stage": 0,
                                                             "train.precision": "fp32"}))
    assert "done:" in proc.stdout and "ETA" in proc.stdout and "img/s" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 16  # 128 images / 16 per step x 2 epochs
    assert (out / "config.yaml").read_text().count("mae_vit_tiny_patch16") == 1
    picture = Image.open(result["picture"])
    assert picture.size == (4 * 64, 4 * 64)  # 4 images x (original | masked | recon | pasted)
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["step_00000008.png", "step_00000016.png"]
    assert Image.open(out / "loss_curve.png").size[0] > 100
    # The logged lr is the schedule at the step before it was taken (8 steps/epoch, 1 warmup epoch).
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = 1.0e-3 * 16 / 256
    for r in rows:
        assert r["lr"] == pytest.approx(cosine_lr(r["step"] - 1, 8, 2, 1, peak, 0.0))
    assert rows[0]["lr"] == 0.0 and max(r["lr"] for r in rows) == pytest.approx(peak)
    # Learning happened: the last steps' loss is below the first steps'.
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4])


def test_keep_last_prunes_old_checkpoints(small_shards, tmp_path):
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 8, "checkpoint.keep_last": 2}))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000008"]


@pytest.mark.distributed
def test_deepspeed_launcher_world_2(small_shards, tmp_path):
    """`deepspeed --num_gpus 2 --module mae_scale ...` passes --local_rank before the verb."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from run_helpers import ROOT, SMOKE, run_env

    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "run"
    cmd = [launcher, "--num_gpus", "2", "--master_port", "29561", "--module", "mae_scale", "pretrain",
           "--config", str(SMOKE), *base_overrides(small_shards, out, **{"train.max_steps": 2})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_marker(latest_checkpoint(out))["world_size"] == 2


def test_resampled_epochs_with_batched_decode(small_shards, tmp_path):
    """Resampled mode fixes the epoch length; the batched decode path feeds the same trainer."""
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **{
        "data.resampled": "true", "data.epoch_samples": 64, "data.decode_device": "cpu-batched",
        "train.epochs": 2, "checkpoint.every_steps": 100}))
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 8  # 64 samples / 16 per step x 2 epochs
