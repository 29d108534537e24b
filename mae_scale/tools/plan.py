"""`mae-scale plan`: per-GPU memory of an MAE run under DeepSpeed ZeRO 0/1/2/3, before submitting it.

What one GPU holds (Rajbhandari et al., "ZeRO", https://arxiv.org/abs/1910.02054, section 3, with the
mixed-precision recipe DeepSpeed runs in bf16 mode): bf16 parameters (2 bytes each), bf16 gradients
(2), fp32 master weights + Adam's two moments (4 + 4 + 4); ZeRO-1 splits the fp32 state over the
data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the parameters. Frozen parameters (the
fixed sin-cos position tables) have a bf16 copy but no gradient or fp32 state.

Activations are what autograd keeps between forward and backward. On a CUDA device they are measured
by running one forward/backward of the micro-batch; elsewhere they are estimated from the model's
shapes (`activation_bytes_estimate`): per pre-norm ViT block with fused SDPA attention, at T tokens,
width D and MLP width H, autograd saves 8 B*T*D + 2 B*T*H values (block input, LN1 output, q/k/v,
attention output, LN2 input and output, fc1 output, GELU output) plus LayerNorm statistics and the
attention log-sum-exp. MAE runs its encoder on 1 + keep tokens and its decoder on 1 + L tokens. The
estimate is checked against an exact count of the tensors autograd saves (`saved_activation_bytes`,
via `torch.autograd.graph.saved_tensors_hooks`) in tests/test_plan.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from mae_scale.models import build_mae

GIB = 2**30

# Assumed, not measured: CUDA context + NCCL communicator buffers + allocator fragmentation per GPU.
FRAMEWORK_OVERHEAD_GIB = 3.0


@dataclass(frozen=True)
class MaeShapes:
    """The numbers that decide an MAE step's memory and FLOPs, read off a built model."""

    img_size: int
    patch: int
    num_patches: int  # L
    keep: int  # visible patches the encoder sees
    dim: int
    depth: int
    heads: int
    dec_dim: int
    dec_depth: int
    dec_heads: int
    mlp_ratio: float
    total_params: int
    trainable_params: int
    encoder_params: int  # everything outside the decoder, fixed position table included

    @property
    def patch_pixels(self) -> int:
        return self.patch * self.patch * 3


def mae_shapes(net: torch.nn.Module, mask_ratio: float = 0.75) -> MaeShapes:
    L = net.patch_embed.num_patches
    attn, dec_attn = net.blocks[0].attn, net.decoder_blocks[0].attn
    params = dict(net.named_parameters())
    return MaeShapes(
        img_size=net.patch_embed.img_size[0], patch=net.patch_size, num_patches=L, keep=int(L * (1 - mask_ratio)),
        dim=net.cls_token.shape[-1], depth=len(net.blocks), heads=attn.num_heads,
        dec_dim=net.mask_token.shape[-1], dec_depth=len(net.decoder_blocks), dec_heads=dec_attn.num_heads,
        mlp_ratio=net.blocks[0].mlp.fc1.out_features / net.cls_token.shape[-1],
        total_params=sum(p.numel() for p in params.values()),
        trainable_params=sum(p.numel() for p in params.values() if p.requires_grad),
        encoder_params=sum(p.numel() for k, p in params.items() if not k.startswith("decoder") and k != "mask_token"),
    )


def shapes_for(model: str, img_size: int = 224, mask_ratio: float = 0.75) -> MaeShapes:
    """Shapes and parameter counts without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        net = build_mae(model, img_size=img_size)
    return mae_shapes(net, mask_ratio)


def _block_bytes(batch: int, tokens: int, dim: int, hidden: int, heads: int, act: int, stat: int) -> int:
    """Saved tensors of one pre-norm ViT block with SDPA (see the module docstring)."""
    values = batch * tokens * (8 * dim + 2 * hidden) * act
    ln_stats = 2 * 2 * batch * tokens * stat  # mean and rstd of both LayerNorms
    lse = batch * heads * tokens * 4  # attention log-sum-exp, always fp32
    return values + ln_stats + lse


def activation_bytes_estimate(s: MaeShapes, batch: int, act_bytes: int = 2, stat_bytes: int = 4) -> dict:
    """Bytes autograd saves for one MAE forward of `batch` images, from the shapes alone.

    act_bytes=2: the network runs in bf16 (DeepSpeed's bf16 mode casts the module). LayerNorm
    statistics are fp32 on CUDA (stat_bytes=4) and bf16 on CPU (2). Returns the parts and "total".
    """
    B, L, k, D, Dd, P = batch, s.num_patches, s.keep, s.dim, s.dec_dim, s.patch_pixels
    enc = s.depth * _block_bytes(B, 1 + k, D, int(D * s.mlp_ratio), s.heads, act_bytes, stat_bytes)
    dec = s.dec_depth * _block_bytes(B, 1 + L, Dd, int(Dd * s.mlp_ratio), s.dec_heads, act_bytes, stat_bytes)
    other = (
        B * 3 * s.img_size**2 * act_bytes  # patch-embedding conv input
        + B * L * D * act_bytes + B * L * 8  # masking gather: its input and the int64 order
        + 2 * B * (1 + k) * D * act_bytes + 2 * B * (1 + k) * stat_bytes  # encoder norm in, decoder_embed in
        + B * L * Dd * act_bytes + B * L * 8  # un-shuffle gather
        + 2 * B * (1 + L) * Dd * act_bytes + 2 * B * (1 + L) * stat_bytes  # decoder norm in, pred in
        + B * L * P * 4 + B * L * 4  # fp32 (pred - target) for the squared error, and the mask
    )
    return {"encoder": enc, "decoder": dec, "other": other, "total": enc + dec + other}


def backward_working_bytes(s: MaeShapes, batch: int, act_bytes: int = 2) -> int:
    """Assumed headroom for backward's temporaries: gradients of three of the largest activations
    (an MLP hidden tensor of the wider of encoder / decoder) alive at once."""
    widest = max((1 + s.keep) * s.dim, (1 + s.num_patches) * s.dec_dim) * s.mlp_ratio
    return int(3 * batch * widest * act_bytes)


def saved_activation_bytes(net: torch.nn.Module, imgs: torch.Tensor, mask_ratio: float = 0.75,
                           noise: torch.Tensor | None = None) -> int:
    """Exact bytes of the distinct storages autograd saves in one forward (parameters left out;
    autocast's low-precision weight copies counted, since they occupy memory too)."""
    param_storages = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = net(imgs, mask_ratio=mask_ratio, noise=noise)
    del loss
    return sum(seen.values())


def measure_activation_bytes_cuda(model: str, batch: int, img_size: int, mask_ratio: float) -> int:
    """Peak allocated during one bf16 forward/backward minus the weights and their gradients."""
    device = torch.device("cuda")
    net = build_mae(model, img_size=img_size, norm_pix_loss=True).to(device, torch.bfloat16)
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss, _, _ = net(imgs, mask_ratio=mask_ratio)
    loss.backward()
    torch.cuda.synchronize()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None)
    peak = torch.cuda.max_memory_allocated(device) - before - grads - imgs.numel() * 4
    del net, imgs, loss
    torch.cuda.empty_cache()
    return peak


def zero_state_bytes(total: int, trainable: int, world: int, stage: int) -> dict:
    """Per-GPU bytes of bf16 params, bf16 grads, fp32 master + Adam moments at a ZeRO stage."""
    n = max(world, 1)
    return {
        "params": 2 * total / (n if stage >= 3 else 1),
        "grads": 2 * trainable / (n if stage >= 2 else 1),
        "optim": 12 * trainable / (n if stage >= 1 else 1),
        # fp32 copy of this rank's gradient partition, made at the optimizer step only (activations are
        # freed by then, so it competes with them for the peak instead of adding to it).
        "step_fp32_grads": 4 * trainable / (n if stage >= 1 else 1),
    }


def zero_comm_bytes(trainable: int, world: int, stage: int, accum: int = 1, bytes_per: int = 2) -> float:
    """Bytes each GPU sends per optimizer step (ring collectives move (n-1)/n of the buffer per rank).

    ZeRO-0/1 reduce the bf16 gradients once, at the accumulation boundary; ZeRO-2 reduce-scatters
    them on every micro-step (deepspeed stage_1_and_2.py, `reduce_ready_partitions_and_remove_grads`).
    ZeRO-0 all-reduces (= reduce-scatter + all-gather of grads); ZeRO-1/2 all-gather the updated bf16
    params after the step; ZeRO-3 all-gathers params in forward and again in backward and
    reduce-scatters grads on every micro-step.
    """
    n = world
    if n <= 1:
        return 0.0
    ring = (n - 1) / n
    one = bytes_per * trainable * ring  # one reduce-scatter or all-gather of the full model
    if stage == 0:
        return 2 * one
    if stage == 1:
        return 2 * one
    if stage == 2:
        return accum * one + one
    return accum * 3 * one


def plan_memory(cfg, nodes: int, gpus_per_node: int, micro_batch: int | None = None,
                gpu_memory_gib: float = 80.0, measure: bool | None = None) -> dict:
    """Per-GPU memory at ZeRO 0..3 for the config's model and micro-batch, and the batch layout.

    Raises ConfigError when the global batch does not divide into world x micro-batch x accumulation.
    """
    from mae_scale.config import check_batch_layout
    from mae_scale.optim import deepspeed_config

    if micro_batch is not None:
        cfg.train.micro_batch_size = micro_batch
    world = nodes * gpus_per_node
    accum = check_batch_layout(cfg, world)
    B = cfg.train.micro_batch_size
    s = shapes_for(cfg.model.name, cfg.data.input_size, cfg.model.mask_ratio)
    if measure is None:
        measure = torch.cuda.is_available()
    if measure:
        acts = measure_activation_bytes_cuda(cfg.model.name, B, cfg.data.input_size, cfg.model.mask_ratio)
        act_source = f"measured on {torch.cuda.get_device_name()} (one bf16 forward/backward)"
        working = 0  # the measured peak already includes backward's temporaries
    else:
        acts = activation_bytes_estimate(s, B)["total"]
        act_source = "estimated from the model's shapes (no CUDA device here)"
        working = backward_working_bytes(s, B)
    if cfg.model.grad_checkpointing:
        act_source += "; NOTE model.grad_checkpointing=true stores far less (not modelled: figure is without it)"
    zero = deepspeed_config(cfg, accum)["zero_optimization"]
    # Gradient buckets (bf16; overlap_comm on GPU double-buffers the reduce bucket) + all-gather bucket.
    buckets = 2 * (2 * zero["reduce_bucket_size"] + zero["allgather_bucket_size"])
    stages = []
    for stage in range(4):
        st = zero_state_bytes(s.total_params, s.trainable_params, world, stage)
        static = st["params"] + st["grads"] + st["optim"] + (buckets if stage else 0) + FRAMEWORK_OVERHEAD_GIB * GIB
        peak = static + max(acts + working, st["step_fp32_grads"])
        stages.append({"stage": stage, **st, "buckets": buckets if stage else 0, "activations": acts,
                       "backward_working": working, "total": peak, "fits": peak <= gpu_memory_gib * GIB,
                       "comm_bytes_per_step": zero_comm_bytes(s.trainable_params, world, stage, accum)})
    return {"model": cfg.model.name, "shapes": s, "nodes": nodes, "gpus_per_node": gpus_per_node, "world": world,
            "micro_batch": B, "accum": accum, "global_batch": cfg.train.global_batch_size,
            "config_stage": cfg.train.zero_stage, "gpu_memory_gib": gpu_memory_gib, "activation_source": act_source,
            "stages": stages}


def format_plan(p: dict) -> str:
    s: MaeShapes = p["shapes"]
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [
        f"{p['model']}: {s.total_params / 1e6:.1f} M parameters ({s.trainable_params / 1e6:.1f} M trained; "
        f"encoder {s.encoder_params / 1e6:.1f} M), {s.img_size} px, encoder {1 + s.keep} tokens, decoder "
        f"{1 + s.num_patches} tokens",
        f"batch: {p['world']} GPUs ({p['nodes']} nodes x {p['gpus_per_node']}) x micro-batch {p['micro_batch']} x "
        f"accumulation {p['accum']} = global batch {p['global_batch']}",
        f"activations: {p['activation_source']}",
        "",
        "| ZeRO | bf16 params | bf16 grads | fp32 master + Adam | buckets | activations | backward temp | "
        f"framework | total GiB | fits {p['gpu_memory_gib']:g} GiB | comm GB/step/GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["stages"]:
        mark = " (config)" if r["stage"] == p["config_stage"] else ""
        lines.append(
            f"| {r['stage']}{mark} | {g(r['params'])} | {g(r['grads'])} | {g(r['optim'])} | {g(r['buckets'])} | "
            f"{g(r['activations'])} | {g(r['backward_working'])} | {FRAMEWORK_OVERHEAD_GIB:.1f} | {g(r['total'])} | "
            f"{'yes' if r['fits'] else 'NO'} | {r['comm_bytes_per_step'] / 1e9:.2f} |")
    lines += [
        "",
        "Assumptions: bf16 params/grads, fp32 master weights + Adam moments (12 bytes per trained parameter);",
        f"framework overhead (CUDA context, NCCL, fragmentation) {FRAMEWORK_OVERHEAD_GIB:g} GiB assumed; "
        "total = static + max(activations + backward temp, fp32 grad partition at the optimizer step);",
        "comm = bytes each GPU sends per optimizer step, ring collectives, bf16 (see docs/SCALING.md).",
    ]
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    from mae_scale.config import ConfigError, load_config

    # A login node or laptop where the shards are not mounted: scope "plan" checks the model and the
    # numbers, not data, directories or devices (the plan reads no data).
    cfg = load_config(args.config, args.overrides, scope="plan")
    from mae_scale.objectives import OBJECTIVES

    if OBJECTIVES[cfg.model.objective].encoder_sees_masked_tokens:
        raise ConfigError(f"plan models MAE's shapes (encoder on visible patches only); {args.config} is a "
                          f"{cfg.model.objective} preset, whose encoder sees every token: not covered yet")
    result = plan_memory(cfg, args.nodes, args.gpus_per_node, args.micro_batch, args.gpu_memory_gib)
    print(format_plan(result))
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    from mae_scale.cli_args import positive_float, positive_int

    p = subparsers.add_parser("plan", help="per-GPU memory at ZeRO 0/1/2/3 and the batch layout, before submitting")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/pretrain/mae_vit_tiny_smoke.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.zero_stage=2")
    # Refused as they are parsed (one line, status 2): a zero would divide the batch by nothing, NaN
    # would print a plan where every figure fits.
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="images per GPU per micro-step (default: the config's)")
    p.add_argument("--gpu-memory-gib", type=positive_float, default=80.0)
    p.set_defaults(run=run_plan)
    return p
