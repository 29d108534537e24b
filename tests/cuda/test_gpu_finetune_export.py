"""The weights of a GPU-trained ZeRO-3 run go on: `mae-scale export` consolidates them into a timm
ViT (strict load, the fp32 masters exactly), one fine-tuning step on the GPU starts from that file,
evaluates, checkpoints, and its run exports in turn (the fine-tuned encoder, moved by the step)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cuda_support import ON_GPU, STEPS, needs_gpu_or_rehearsal, record
from run_helpers import ROOT, run_env
from mae_scale.checkpoint import latest_checkpoint
from mae_scale.checkpoint import consolidate
from mae_scale.models import VIT_ARCHS

pytestmark = [pytest.mark.cuda, needs_gpu_or_rehearsal]

FT = ROOT / "configs/finetune/vit_base_patch16_100ep.yaml"


def mae_scale(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mae_scale", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, f"mae-scale {args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _timm_vit(num_classes: int = 0, **kw):
    import timm

    arch = VIT_ARCHS["vit_tiny_patch16"]  # the smoke preset's encoder: timm's tiny sizes, 4 blocks
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=64,
                             depth=arch.depth, embed_dim=arch.embed_dim, num_heads=arch.num_heads, **kw)


def test_export_then_finetune_one_step_then_export(gpu_runs, small_shards, tmp_path):
    run = gpu_runs[3]["straight"]
    assert gpu_runs[3]["procs"]["straight"].returncode == 0, gpu_runs[3]["procs"]["straight"].stderr[-3000:]
    enc_file = tmp_path / "encoder.safetensors"
    mae_scale("export", run, "--out", enc_file)
    encoder = load_file(str(enc_file))
    masters, info = consolidate(run)
    assert info["zero_stage"] == 3 and info["step"] == STEPS
    assert all(torch.equal(t, masters[k]) for k, t in encoder.items())
    vit = _timm_vit()
    vit.load_state_dict(encoder, strict=True)
    device = torch.device("cuda" if ON_GPU else "cpu")
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        feats = vit.to(device).eval().forward_features(torch.randn(2, 3, 64, 64, device=device))
    assert feats.shape == (2, 1 + 16, 192) and torch.isfinite(feats).all()

    classes = json.loads((small_shards / "manifest.json").read_text())["num_classes"]
    out = tmp_path / "ft"
    proc = mae_scale("finetune", "--config", FT, f"output_dir={out}", "model.arch=vit_tiny_patch16",
                     f"model.num_classes={classes}", f"model.init={enc_file}",
                     f"data.train_shards={small_shards}", f"data.val_shards={small_shards}", "data.input_size=64",
                     "data.num_workers=0", "data.eval_batch_size=32", "train.global_batch_size=16",
                     "train.micro_batch_size=8", "train.epochs=1", "train.warmup_epochs=0", "train.max_steps=1",
                     "train.log_every_steps=1", "train.zero_stage=1", "train.precision=bf16",
                     "tracking.enabled=false")
    assert f"initialized from {enc_file}" in proc.stdout
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals and evals[-1]["step"] == 1 and evals[-1]["samples"] == 128  # every image once
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in evals)
    assert latest_checkpoint(out).name == "step_00000001"

    ft_file = tmp_path / "finetuned.safetensors"
    mae_scale("export", out, "--out", ft_file)
    tuned = load_file(str(ft_file))
    clf = _timm_vit(num_classes=classes, global_pool="avg")
    missing, unexpected = clf.load_state_dict(tuned, strict=False)
    assert not unexpected, unexpected
    moved = [k for k in encoder if k in tuned and not torch.equal(encoder[k], tuned[k])]
    record(test="finetune_export", zero_pretrain=3, eval_acc1=evals[-1]["acc1"], eval_loss=evals[-1]["loss"],
           encoder_tensors=len(encoder), moved_by_one_step=len(moved), missing_in_timm=sorted(missing))
    assert moved, "one fine-tuning step left every encoder weight where it was"
