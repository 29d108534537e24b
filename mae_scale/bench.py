"""`mae-scale bench step`: measured images/s, step time, peak memory and (on GPU) model FLOPs
utilization of one MAE training step (forward, backward, AdamW step) on the current device.

FLOPs are counted analytically from the architecture (matrix multiplies x 2, forward x 3 for
forward + backward), the way MFU is usually reported: recomputation is not counted as useful work.
Figures are medians over repeats so that a noisy shared machine reports something stable.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from mae_scale.models import build_mae

# Dense bf16 peak of the GPUs people run this on, FLOP/s (no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def mae_train_flops(model, batch: int, mask_ratio: float = 0.75) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) for `batch` images."""
    L = model.patch_embed.num_patches
    p = model.patch_embed.patch_size[0]
    D = model.cls_token.shape[-1]
    Dd = model.mask_token.shape[-1]
    pix = p * p * 3
    keep = int(L * (1 - mask_ratio))
    mlp = model.blocks[0].mlp.fc1.out_features / D

    def block(tokens: int, dim: int) -> float:  # qkv + proj + mlp, then scores and weighted sum
        return 2 * tokens * dim * dim * (4 + 2 * mlp) + 4 * tokens * tokens * dim

    enc = len(model.blocks) * block(1 + keep, D) + 2 * L * pix * D
    dec = len(model.decoder_blocks) * block(1 + L, Dd) + 2 * (1 + keep) * D * Dd + 2 * L * Dd * pix
    return 3.0 * batch * (enc + dec)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def bench_step(model: str, batch: int, precision: str = "bf16", steps: int = 10, warmup: int = 3,
               img_size: int = 224, repeats: int = 3, mask_ratio: float = 0.75) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = build_mae(model, img_size=img_size, norm_pix_loss=True).to(device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda" or None)
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            loss, _, _ = net(imgs, mask_ratio=mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(times)
    flops = mae_train_flops(net, batch, mask_ratio)
    peak = _peak_flops(device)
    if device.type == "cuda":
        mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
        mem_kind = "GPU peak allocated"
    else:
        mem_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        mem_kind = "process peak RSS"
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "model": model, "batch": batch, "precision": precision, "img_size": img_size,
        "step_s": step_s, "images_per_s": batch / step_s, "gflop_per_image": flops / batch / 1e9,
        "achieved_tflops": flops / step_s / 1e12, "mfu": (flops / step_s / peak) if peak else None,
        "peak_mem_gib": mem_gib, "mem_kind": mem_kind, "repeats": repeats, "steps": steps,
    }
    mfu = f"{row['mfu'] * 100:.1f} %" if row["mfu"] is not None else "n/a (CPU)"
    row["table"] = "\n".join([
        "| device | model | batch | precision | images/s | step time | GFLOP/img | TFLOP/s | MFU | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {row['device']} | {model} | {batch} | {precision} | {row['images_per_s']:.1f} | {step_s * 1000:.1f} ms | "
        f"{row['gflop_per_image']:.1f} | {row['achieved_tflops']:.2f} | {mfu} | {mem_gib:.2f} GiB ({mem_kind}) |",
        f"median of {repeats} repeats x {steps} steps after {warmup} warmup steps",
    ])
    return row
