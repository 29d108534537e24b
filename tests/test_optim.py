"""Parameter groups and the per-iteration schedule against MAE's formula."""

import math
from pathlib import Path

import pytest
import torch

from mae_scale.config import load_config
from mae_scale.models import mae_vit_tiny_patch16
from mae_scale.models.mim import build_mim
from mae_scale.optim import NO_DECAY_NAMES, build_optimizer, cosine_lr, deepspeed_config, param_groups_weight_decay, set_lr

ROOT = Path(__file__).resolve().parents[1]


def test_schedule_warmup_peak_end():
    spe, epochs, warm, peak, floor = 10, 20, 4, 2.4e-3, 1e-5
    total = spe * epochs
    assert cosine_lr(0, spe, epochs, warm, peak, floor) == 0.0
    assert cosine_lr(spe * warm / 2, spe, epochs, warm, peak, floor) == pytest.approx(peak / 2)
    assert cosine_lr(spe * 1, spe, epochs, warm, peak, floor) == pytest.approx(peak * 1 / warm)
    assert cosine_lr(spe * warm, spe, epochs, warm, peak, floor) == pytest.approx(peak)
    mid = spe * (warm + (epochs - warm) / 2)
    assert cosine_lr(mid, spe, epochs, warm, peak, floor) == pytest.approx((peak + floor) / 2)
    assert cosine_lr(total, spe, epochs, warm, peak, floor) == pytest.approx(floor)
    # Per iteration, not per epoch: consecutive steps inside one epoch differ.
    assert cosine_lr(spe * 10 + 1, spe, epochs, warm, peak, floor) < cosine_lr(spe * 10, spe, epochs, warm, peak, floor)
    # The formula itself, at an arbitrary step after warmup.
    s = 123
    e = s / spe
    expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (e - warm) / (epochs - warm)))
    assert cosine_lr(s, spe, epochs, warm, peak, floor) == pytest.approx(expected)


def test_no_weight_decay_on_biases_norms_tokens_pos_embed():
    model = mae_vit_tiny_patch16()
    groups = param_groups_weight_decay(model, 0.05, NO_DECAY_NAMES)  # every token spared: the earlier rule
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"cls_token", "mask_token"} <= no_decay
    assert "pos_embed" not in decay and "decoder_pos_embed" not in decay  # fixed, not trained at all
    assert all(n.endswith(".bias") or "norm" in n or n in ("cls_token", "mask_token") for n in no_decay)
    assert "blocks.0.attn.qkv.weight" in decay and "patch_embed.proj.weight" in decay
    assert "decoder_pred.weight" in decay and "blocks.0.norm1.weight" in no_decay
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay


def _decayed(model, optimizer) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}


def test_the_official_mae_rule_decays_the_tokens_too():
    """The MAE preset's no_weight_decay=[]: every trainable matrix is decayed, cls_token and mask_token
    included (the official script's add_weight_decay with an empty skip list); biases and norms never."""
    cfg = load_config(ROOT / "configs/pretrain/mae_vit_tiny_smoke.yaml")
    assert cfg.optim.no_weight_decay == []
    model = mae_vit_tiny_patch16()
    decayed = _decayed(model, build_optimizer(model, cfg))
    matrices = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1}
    assert decayed == matrices and {"cls_token", "mask_token"} <= decayed
    earlier = load_config(ROOT / "configs/pretrain/mae_vit_tiny_smoke.yaml",
                          ["optim.no_weight_decay=[cls_token,mask_token,pos_embed,decoder_pos_embed]"])
    assert _decayed(model, build_optimizer(model, earlier)) == matrices - {"cls_token", "mask_token"}


def test_the_official_simmim_rule_spares_cls_token_and_pos_embed_but_decays_mask_token():
    cfg = load_config(ROOT / "configs/pretrain/mae_vit_tiny_smoke.yaml", ["optim.no_weight_decay=[cls_token,pos_embed]"])
    model = build_mim("vit_tiny_patch4", "simmim", img_size=16)
    decayed = _decayed(model, build_optimizer(model, cfg))
    assert "mask_token" in decayed and "cls_token" not in decayed and "pos_embed" not in decayed
    assert model.pos_embed.requires_grad and "blocks.0.attn.qkv.weight" in decayed


def test_set_lr_applies_scale():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": 0.5}, {"params": [torch.nn.Parameter(torch.zeros(1))]}])
    set_lr(opt, 1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and opt.param_groups[1]["lr"] == pytest.approx(1e-3)


def test_deepspeed_config_generated_from_typed_config():
    cfg = load_config("configs/pretrain/mae_vit_tiny_smoke.yaml",
                      ["train.zero_stage=2", "optim.clip_grad=1.0", "deepspeed={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg, accum_steps=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["overlap_comm"] is True  # raw dict merged on top
