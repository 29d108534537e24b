"""`mae-scale bench step`: measured images/s, step time, peak memory and (on GPU) model FLOPs
utilization of one MAE training step (forward, backward, AdamW step) on the current device.

Two setups built from the same model, so their ratio says what the project's choices buy:
- fast (the project's): bf16 autocast, fused `scaled_dot_product_attention`, fused AdamW, and with
  `--compile` every transformer block through `torch.compile`;
- baseline (the official MAE recipe, https://github.com/facebookresearch/mae `main_pretrain.py`):
  fp16 autocast with a GradScaler, attention as explicit softmax(q k^T) v, for-loop AdamW, eager.
  On a CPU, fp16 matmuls are emulated and slow, so the baseline uses bf16 autocast there (with the
  GradScaler kept, so its bookkeeping is still paid); the table says so.

FLOPs are counted analytically from the architecture by `mae_scale.speed` (matrix multiplies x 2,
forward x 3 for forward + backward), as the trainer counts them for its in-run MFU.
Figures are medians over repeats; `--compare` alternates the setups repeat by repeat, so a noisy
shared machine slows both alike and the ratio stays meaningful.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from mae_scale.cli_args import non_negative_int, positive_int
from mae_scale.models import MODEL_NAMES, build_mae
from mae_scale.speed import mae_train_flops, peak_flops

@dataclass(frozen=True)
class Variant:
    """One way of running the same training step."""

    baseline: bool = False
    compile: bool = False
    precision: str = "bf16"  # bf16 | fp32; fp32 turns autocast (and the baseline's scaler) off

    @property
    def name(self) -> str:
        return ("baseline" if self.baseline else "fast") + (" + compile" if self.compile else "")

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.precision == "fp32":
            return None
        if self.baseline and device.type == "cuda":
            return torch.float16  # the official recipe
        return torch.bfloat16

    def describe(self, device: torch.device) -> str:
        amp = self.amp_dtype(device)
        if amp is None:
            prec = "fp32"
        elif self.baseline:
            prec = ("fp16" if amp == torch.float16 else "bf16 (fp16 on CPU is emulated)") + " autocast + GradScaler"
        else:
            prec = "bf16 autocast"
        attn = "explicit softmax(qk^T)v" if self.baseline else "fused SDPA"
        adam = "for-loop AdamW" if self.baseline else "fused AdamW"
        return f"{prec}, {attn}, {adam}, {'compiled blocks' if self.compile else 'eager'}"


def set_fused_attention(net: torch.nn.Module, fused: bool) -> None:
    """timm's Attention picks SDPA or the explicit product per module through `fused_attn`."""
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


class TrainStep(NamedTuple):
    net: torch.nn.Module
    step: Callable[..., torch.Tensor]  # step(noise=None) -> loss: forward, backward, optimizer step
    imgs: torch.Tensor  # the fixed input batch
    optimizer: torch.optim.Optimizer


def build_train_step(model: str, batch: int, variant: Variant, device: torch.device, img_size: int = 224,
                     mask_ratio: float = 0.75, seed: int = 0) -> TrainStep:
    """The model, its step closure and input batch for one variant; the same seed gives the same weights."""
    torch.manual_seed(seed)
    net = build_mae(model, img_size=img_size, norm_pix_loss=True).to(device)
    set_fused_attention(net, not variant.baseline)
    params = [p for p in net.parameters() if p.requires_grad]
    adam = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    opt = (torch.optim.AdamW(params, foreach=False, fused=False, **adam) if variant.baseline
           else torch.optim.AdamW(params, fused=True, **adam))
    amp = variant.amp_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=variant.baseline and amp is not None)
    if variant.compile:
        for blk in [*net.blocks, *net.decoder_blocks]:
            blk.compile()  # in place: parameter names (and checkpoints) stay the same
    gen = torch.Generator(device="cpu").manual_seed(seed)
    imgs = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device)

    def step(noise: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss, _, _ = net(imgs, mask_ratio=mask_ratio, noise=noise)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return TrainStep(net, step, imgs, opt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(net: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights + optimizer state: what a variant keeps between steps."""
    tensors = list(net.parameters()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_memory_count(ts: TrainStep, variant: Variant, mask_ratio: float) -> int:
    """On a CPU there is no allocator peak to read: count params + grads + Adam state + what autograd
    saves in one forward. (RSS is the process's all-time maximum: useless side by side.) Saved-tensor
    hooks only see eager code, so compiled blocks are counted through their eager form."""
    from mae_scale.tools.plan import saved_activation_bytes

    net, imgs = ts.net, ts.imgs
    blocks = [*net.blocks, *net.decoder_blocks]
    compiled = [b._compiled_call_impl for b in blocks]
    for b in blocks:
        b._compiled_call_impl = None
    amp = variant.amp_dtype(imgs.device)
    try:
        with torch.autocast(imgs.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            saved = saved_activation_bytes(net, imgs, mask_ratio)
    finally:
        for b, c in zip(blocks, compiled):
            b._compiled_call_impl = c
    grads = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return _resident_bytes(net, ts.optimizer) + grads + saved


def bench_variants(model: str, batch: int, variants: list[Variant], steps: int = 10, warmup: int = 3,
                   img_size: int = 224, repeats: int = 3, mask_ratio: float = 0.75) -> dict:
    """Time each variant, alternating repeat by repeat; medians, ratios against the first variant."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = [build_train_step(model, batch, v, device, img_size, mask_ratio) for v in variants]
    compile_s = []
    for _, step, _, _ in built:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        compile_s.append(time.perf_counter() - t0)
    times: list[list[float]] = [[] for _ in variants]
    peaks = [0] * len(variants)
    resident = [_resident_bytes(ts.net, ts.optimizer) for ts in built]
    for _ in range(repeats):
        for i, (_, step, _, _) in enumerate(built):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            times[i].append((time.perf_counter() - t0) / steps)
            if device.type == "cuda":  # the other variants' weights and Adam state sit there too
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device) - (sum(resident) - resident[i]))
    if device.type != "cuda":
        peaks = [_cpu_memory_count(ts, v, mask_ratio) for ts, v in zip(built, variants)]
    flops = mae_train_flops(built[0][0], batch, mask_ratio)
    peak = peak_flops(device)
    rows = []
    for v, t, mem, warm_s in zip(variants, times, peaks, compile_s):
        step_s = statistics.median(t)
        rows.append({
            "variant": v.name, "setup": v.describe(device), "step_s": step_s, "images_per_s": batch / step_s,
            "achieved_tflops": flops / step_s / 1e12, "mfu": flops / step_s / peak if peak else None,
            "peak_mem_gib": mem / 2**30, "warmup_s": warm_s, "step_times_s": t,
            "speedup_vs_first": statistics.median(times[0]) / step_s,
        })
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({torch.get_num_threads()} threads)")
    mem_kind = ("GPU peak allocated" if device.type == "cuda"
                else "counted: params + grads + Adam + autograd-saved activations")
    result = {"device": device_name, "model": model, "batch": batch, "img_size": img_size, "mask_ratio": mask_ratio,
              "gflop_per_image": flops / batch / 1e9, "steps": steps, "warmup": warmup, "repeats": repeats,
              "torch": torch.__version__, "mem_kind": mem_kind, "rows": rows}
    result["table"] = format_table(result)
    return result


def format_table(r: dict) -> str:
    lines = [
        f"{r['model']}, batch {r['batch']}, {r['img_size']} px, {r['gflop_per_image']:.1f} GFLOP/image (analytic), "
        f"on {r['device']}, torch {r['torch']}",
        "| variant | setup | images/s | step time | TFLOP/s | MFU | peak memory | x first | warmup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        mfu = f"{row['mfu'] * 100:.1f} %" if row["mfu"] is not None else "n/a (CPU)"
        lines.append(f"| {row['variant']} | {row['setup']} | {row['images_per_s']:.1f} | "
                     f"{row['step_s'] * 1000:.1f} ms | {row['achieved_tflops']:.3f} | {mfu} | {row['peak_mem_gib']:.2f} GiB | "
                     f"{row['speedup_vs_first']:.2f} | {row['warmup_s']:.1f} s |")
    lines.append(f"median of {r['repeats']} repeats x {r['steps']} steps after {r['warmup']} warmup steps; "
                 f"peak memory: {r['mem_kind']}; warmup includes compilation")
    if len(r["rows"]) > 1:
        lines.append("setups alternate repeat by repeat; 'x first' = first row's step time / this row's")
    return "\n".join(lines)


def bench_step(model: str, batch: int, precision: str = "bf16", steps: int = 10, warmup: int = 3,
               img_size: int = 224, repeats: int = 3, mask_ratio: float = 0.75, baseline: bool = False,
               compile: bool = False) -> dict:
    """One setup: the fast path by default (kept for callers of the single-row form)."""
    result = bench_variants(model, batch, [Variant(baseline, compile, precision)], steps, warmup, img_size,
                            repeats, mask_ratio)
    return {**result, **result["rows"][0], "precision": precision}


def variants_from_args(args: argparse.Namespace) -> list[Variant]:
    if args.compare:  # baseline first, so every ratio reads "x faster than the official setup"
        out = [Variant(True, False, args.precision), Variant(False, False, args.precision)]
        return out + ([Variant(False, True, args.precision)] if args.compile else [])
    return [Variant(args.baseline, args.compile, args.precision)]


def add_bench_step_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", choices=MODEL_NAMES, default="mae_vit_base_patch16")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: autocast (the baseline uses fp16 + GradScaler on GPU); fp32: no autocast")
    parser.add_argument("--img-size", type=positive_int, default=224, help="a multiple of the model's patch size")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=3, help="the table shows the median over repeats")
    parser.add_argument("--baseline", action="store_true",
                        help="the official MAE setup: fp16 + GradScaler, unfused attention, for-loop AdamW, eager")
    parser.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    parser.add_argument("--compare", action="store_true",
                        help="baseline and fast (and fast + compile with --compile) alternately, with ratios")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=run_bench_step)
    return parser


def run_bench_step(args: argparse.Namespace) -> int:
    from mae_scale.errors import UserError
    from mae_scale.models.vit import VIT_ARCHS

    patch = VIT_ARCHS[args.model.removeprefix("mae_")].patch_size  # MAE preset mae_X is encoder X
    if args.img_size % patch:  # refused before minutes of model building and warmup
        raise UserError(f"--img-size {args.img_size} is not a multiple of {args.model}'s patch size {patch}; "
                        f"try {max(patch, args.img_size // patch * patch)}")
    result = bench_variants(args.model, args.batch, variants_from_args(args), args.steps, args.warmup,
                            args.img_size, args.repeats)
    print(json.dumps({k: v for k, v in result.items() if k != "table"}) if args.json else result["table"])
    return 0
