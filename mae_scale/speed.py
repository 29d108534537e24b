"""How fast a training step is: model FLOPs per image, the device's peak, and the measured figures
of one logged step (images/s, data wait, TFLOP/s, MFU, memory).

FLOPs are counted analytically from the built model, the way model FLOPs utilization is usually
reported (PaLM, appendix B): every matrix multiply counts 2 x m x n x k, a training step counts
3 x the forward (the backward is twice the forward), and recomputation (gradient checkpointing)
is not useful work, so it is not counted. Element-wise work (norms, GELU, softmax) is left out.
Whatever is counted is counted alike for the project's trainer and for `bench step`, so their MFU
figures compare.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# Dense bf16 tensor-core peak of one GPU in TFLOP/s (no sparsity), from the vendors' data sheets.
# The first name that occurs in `torch.cuda.get_device_name()` wins, so the longer names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The table's peak for a GPU's name as torch reports it, or None for a GPU it does not know."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def peak_flops(device: torch.device, configured_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device: the configured figure, else the table's for this GPU, else None
    (a CPU, or a GPU the table does not know: MFU is then left out rather than guessed)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_for(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


def linear_flops(module: nn.Module, tokens: int) -> float:
    """2 x tokens x in x out for every Linear inside `module`."""
    return sum(2.0 * tokens * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_flops(block: nn.Module, tokens: int) -> float:
    """One forward of a pre-norm transformer block over `tokens` tokens: its linear layers (qkv,
    proj, MLP) plus the attention scores q k^T and the weighted sum of v (2 x 2 x tokens^2 x dim)."""
    dim = block.attn.qkv.in_features
    return linear_flops(block, tokens) + 4.0 * tokens * tokens * dim


def patch_embed_flops(model: nn.Module) -> float:
    """The patch embedding is a linear map of each patch's pixels to the width."""
    conv = model.patch_embed.proj
    pixels = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return 2.0 * model.patch_embed.num_patches * pixels * conv.out_channels


def mae_train_flops(model: nn.Module, batch: int, mask_ratio: float = 0.75) -> float:
    """One MAE training step for `batch` images: the encoder over the kept patches (+ cls), the
    decoder over all patches (+ cls), its embedding and pixel prediction."""
    num_patches = model.patch_embed.num_patches
    keep = int(num_patches * (1 - mask_ratio))
    enc = sum(block_flops(b, 1 + keep) for b in model.blocks) + patch_embed_flops(model)
    dec = (linear_flops(model.decoder_embed, 1 + keep) + sum(block_flops(b, 1 + num_patches) for b in model.decoder_blocks)
           + linear_flops(model.decoder_pred, num_patches))
    return 3.0 * batch * (enc + dec)


def encoder_forward_flops(model: nn.Module) -> float:
    """One forward of a ViT encoder over all patches + cls (SimMIM, BEiT-style, fine-tuning)."""
    return sum(block_flops(b, 1 + model.patch_embed.num_patches) for b in model.blocks) + patch_embed_flops(model)


def mim_train_flops(model: nn.Module, batch: int, masked_tokens: int) -> float:
    """SimMIM / BEiT-style: the encoder sees every patch; SimMIM's 1x1-conv head predicts every
    patch's pixels, BEiT's linear head scores only the masked ones. A tokenizer's forward (no
    gradient, not trained) is not counted."""
    num_patches = model.patch_embed.num_patches
    if getattr(model, "simmim_head", None) is not None:
        head = model.simmim_head
        head_flops = 2.0 * num_patches * head.in_channels * head.out_channels
    else:
        head_flops = linear_flops(model.beit_head, masked_tokens)
    return 3.0 * batch * (encoder_forward_flops(model) + head_flops)


def classifier_train_flops(model: nn.Module, batch: int, frozen_encoder: bool) -> float:
    """Fine-tuning: encoder and head, forward and backward. Linear probing: the frozen encoder runs
    forward only (no gradient flows into it), the head forward and backward."""
    head = linear_flops(model.head, 1)
    if frozen_encoder:
        return batch * (encoder_forward_flops(model) + 3.0 * head)
    return 3.0 * batch * (encoder_forward_flops(model) + head)


def memory_peaks(device: torch.device) -> dict:
    """Peak allocated / reserved device memory since the last call (GiB), then a fresh window;
    empty on a CPU, where no allocator peak is kept."""
    if device.type != "cuda":
        return {}
    out = {"mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def step_speed(flops_per_image: float, images: int, step_time_s: float, data_wait_s: float, world_size: int,
               peak: Optional[float]) -> dict:
    """The figures of one optimizer step over `images` images (all ranks): per-device TFLOP/s and
    MFU (None without a known peak), and the share of the step spent waiting for data."""
    per_device = flops_per_image * images / world_size / step_time_s
    return {"images_per_s": images / step_time_s, "step_time_s": step_time_s, "data_wait_s": data_wait_s,
            "data_wait_share": data_wait_s / step_time_s, "tflops": per_device / 1e12,
            "mfu": per_device / peak if peak else None}
