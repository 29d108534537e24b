"""SimMIM and BEiT-style pretraining on the one engine: real runs under ZeRO at world size 2 that
resume exactly, a tokenizer fitted by the CLI, and encoders that export and fine-tune."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import torch

from ckpt_utils import assert_same_checkpoint
from run_helpers import ROOT, run_env
from mae_scale.checkpoint import latest_checkpoint

SIMMIM = ROOT / "configs/pretrain/simmim_vit_base_patch16_800ep.yaml"
BEIT = ROOT / "configs/pretrain/beit_vit_base_patch16_800ep.yaml"
FT = ROOT / "configs/finetune/fashion_mnist_tiny.yaml"


def cli(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mae_scale", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
        "mae_scale", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=run_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def digits_mim(shards, out, objective: str = "beit", **extra) -> list[str]:
    """The 4-px-patch encoder on 16 px digits (a 4x4 token grid), global batch 32, ZeRO-2, bf16; the
    objective's own mask settings (a setting the objective ignores is refused)."""
    values = {"output_dir": out, "model.name": "vit_tiny_patch4", "data.train_shards": shards / "train/manifest.json",
              "data.input_size": 16, "data.num_workers": 0, "train.global_batch_size": 32,
              "train.micro_batch_size": 8, "train.zero_stage": 2, "train.precision": "bf16",
              "train.log_every_steps": 1, "checkpoint.every_steps": 2, "tracking.enabled": "false"}
    values.update({"model.mask_patch_size": 8} if objective == "simmim" else
                  {"model.num_masking_patches": 6, "model.min_block_patches": 2})
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def tokenizer(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    cli("tokenizer", "fit", str(digits_shards / "train/manifest.json"), "--vocab", "16", "--out", str(out),
        "--input-size", "16", "--patch-size", "4", "--max-images", "256")
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("objective", ["simmim", "beit"])
def test_objective_trains_under_zero_at_world2_and_resumes_exactly(objective, digits_shards, tokenizer, tmp_path):
    preset = SIMMIM if objective == "simmim" else BEIT
    extra = {"model.tokenizer": tokenizer} if objective == "beit" else {}
    straight = tmp_path / "straight"
    proc = cli("pretrain", "--config", str(preset), *digits_mim(digits_shards, straight, objective, **extra, **{"train.max_steps": 4}),
               nproc=2)
    losses = [float(line.split("loss ")[1].split()[0]) for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and all(l > 0 for l in losses)
    out = tmp_path / "resumed"
    cli("pretrain", "--config", str(preset), *digits_mim(digits_shards, out, objective, **extra, **{"train.max_steps": 2}), nproc=2)
    proc = cli("pretrain", "--config", str(preset), *digits_mim(digits_shards, out, objective, **extra, **{"train.max_steps": 4}),
               nproc=2)
    assert "resumed from" in proc.stdout
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight))
    assert (out / "reconstructions/step_00000004.png").is_file()


@pytest.fixture(scope="module", params=["simmim", "beit"])
def mim_run(request, digits_shards, tokenizer, tmp_path_factory):
    objective = request.param
    out = tmp_path_factory.mktemp(objective) / "run"
    extra = {"model.tokenizer": tokenizer} if objective == "beit" else {}
    cli("pretrain", "--config", str(SIMMIM if objective == "simmim" else BEIT),
        *digits_mim(digits_shards, out, objective, **extra, **{"train.max_steps": 2, "train.zero_stage": 1}))
    return objective, out


def test_export_and_finetune_accept_the_encoder(mim_run, digits_shards, tmp_path):
    import timm.models.vision_transformer
    from safetensors.torch import load_file

    from mae_scale.models.mim import build_mim

    objective, run = mim_run
    exported = tmp_path / "enc.safetensors"
    cli("export", str(run), "--out", str(exported))
    weights = load_file(str(exported))
    assert not any(k.startswith(("mask_token", "simmim_head", "beit_head")) for k in weights)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=128, depth=6, num_heads=4, qkv_bias=True, init_values=0.1,
        num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    vit.load_state_dict(weights, strict=True)
    model = build_mim("vit_tiny_patch4", objective, img_size=16, vocab_size=16 if objective == "beit" else None)
    model.load_state_dict(weights, strict=False)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # drop path is off in eval mode on both sides; the features agree
        assert torch.allclose(vit.eval().forward_features(imgs), model.eval().forward_encoder(imgs), atol=1e-5)
    # fine-tuning from the run directory: only the new head and fc_norm start fresh
    ft = tmp_path / "ft"
    proc = cli("finetune", "--config", str(FT), f"output_dir={ft}", f"model.init={run}", "model.layer_scale=0.1",
               f"data.train_shards={digits_shards / 'train/manifest.json'}",
               f"data.val_shards={digits_shards / 'val/manifest.json'}", "data.input_size=16", "data.num_workers=0",
               "train.global_batch_size=32", "train.micro_batch_size=16", "train.max_steps=2",
               "tracking.enabled=false")
    assert f"initialized from {run}" in proc.stdout and (ft / "eval.jsonl").is_file()
    from mae_scale.models import build_vit_classifier
    from mae_scale.weights import load_init

    report = load_init(build_vit_classifier("vit_tiny_patch4", 10, img_size=16, layer_scale=0.1), run, kind="finetune")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    # without layer scale the model has no place for the blocks' ls*.gamma: refused, not dropped
    from mae_scale.weights import WeightsError

    with pytest.raises(WeightsError, match="model.layer_scale=0.1"):
        load_init(build_vit_classifier("vit_tiny_patch4", 10, img_size=16), run, kind="linprobe")


def test_beit_without_a_tokenizer_is_refused_before_any_work(digits_shards, tmp_path):
    proc = cli("pretrain", "--config", str(BEIT), *digits_mim(digits_shards, tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "tokenizer fit" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_a_file_that_is_no_tokenizer_ends_in_one_line_before_any_step(digits_shards, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 4)
    proc = cli("pretrain", "--config", str(BEIT), *digits_mim(digits_shards, tmp_path / "run", **{
        "model.tokenizer": junk, "train.max_steps": 2}), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: model.tokenizer: {junk} is not a safetensors file")
    assert "Traceback" not in proc.stderr and "step 1" not in proc.stdout
