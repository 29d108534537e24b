"""Optimizer parameter groups, the per-iteration learning-rate schedule, and the DeepSpeed config.

The DeepSpeed config is generated here from the typed config so there is one source of truth;
`cfg.deepspeed` (a raw dict) is merged on top for anything the typed tree does not cover.
The schedule is MAE's (arXiv 2111.06377, appendix A.1): linear warmup then a half-cycle cosine,
evaluated at every optimizer step from the fractional epoch, applied as lr x group["lr_scale"].
"""

from __future__ import annotations

import math

import torch

from mae_scale.config import TOKEN_NAMES, PretrainConfig, deep_merge, peak_lr

# Tokens and position embeddings by name. Fine-tuning never decays them (as the official MAE/BEiT
# fine-tuning scripts); pretraining decays those not listed in `optim.no_weight_decay`.
NO_DECAY_NAMES = TOKEN_NAMES


def skips_weight_decay(name: str, param: torch.Tensor, exempt: tuple[str, ...]) -> bool:
    """Biases and norm weights (every 1-d parameter) never get decay; nor do the tokens / position
    embeddings named in `exempt` (the rest of their kind are decayed like any matrix)."""
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in exempt


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float, exempt: tuple[str, ...]) -> list[dict]:
    """Two groups: decayed and not decayed; frozen parameters (fixed sin-cos embeddings) are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if skips_weight_decay(name, param, exempt) else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
    ]


def cosine_lr(step: float, steps_per_epoch: int, epochs: int, warmup_epochs: float,
              peak: float, min_lr: float = 0.0) -> float:
    """The LR at optimizer step `step` (0-based): MAE's adjust_learning_rate on the fractional epoch."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply lr x lr_scale to every group (lr_scale carries layer-wise decay when present)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """Plain torch AdamW: DeepSpeed wraps it. Chosen over DeepSpeed's fused/CPU Adam because it
    resumes bit for bit (see the notes on DeepSpeed); on GPU the fused kernel is selected."""
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, tuple(cfg.optim.no_weight_decay))
    fused = torch.cuda.is_available() and next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), fused=fused or None)


def deepspeed_config(cfg: PretrainConfig, accum_steps: int) -> dict:
    """The DeepSpeed JSON config generated from the typed config."""
    t = cfg.train
    zero = {
        "stage": t.zero_stage,
        # Overlap gradient reduction with backward; bucket sizes kept moderate so that CPU
        # deterministic runs do not allocate multi-GB buffers (see the notes on DeepSpeed).
        "overlap_comm": torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if t.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5})
    generated = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
        "steps_per_print": 10**12,  # the trainer prints its own progress
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return deep_merge(generated, cfg.deepspeed)


def schedule_summary(cfg: PretrainConfig, steps_per_epoch: int) -> dict:
    return {
        "peak_lr": peak_lr(cfg),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * cfg.train.epochs,
        "warmup_steps": int(round(steps_per_epoch * cfg.train.warmup_epochs)),
    }


# -- fine-tuning: layer-wise learning-rate decay (BEiT, https://arxiv.org/abs/2106.08254; MAE A.2) -----

def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer a ViT parameter belongs to, for `num_layers` = depth + 1 as BEiT/MAE count it:
    cls token, position embedding and patch embedding are layer 0, block i is layer i + 1, and
    everything after the blocks (final norm, fc_norm, head) is layer depth + 1."""
    if name in ("cls_token", "pos_embed", "mask_token", "dist_token", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: torch.nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     no_weight_decay: tuple[str, ...] = NO_DECAY_NAMES) -> list[dict]:
    """Parameter groups of a ViT with layer-wise LR decay: one group per (layer, decayed or not),
    each with `lr_scale` = layer_decay ** (depth + 1 - layer) and its `weight_decay` (0 for biases,
    norm weights, other 1-d parameters and the tokens / position embeddings). `set_lr` then applies
    lr x lr_scale per group at every iteration. Frozen parameters are left out."""
    depth = len(model.blocks)
    num_layers = depth + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in no_weight_decay
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(key, {"params": [], "param_names": [], "lr_scale": scales[layer],
                                        "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())
