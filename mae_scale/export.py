"""`mae-scale export`: one DeepSpeed checkpoint -> one fp32 safetensors file.

The fp32 master weights are what gets exported, for every ZeRO stage and whatever world size the
checkpoint was written at (`mae_scale.checkpoint.consolidation` says how they are gathered). By
default only the encoder is written, under the names timm's VisionTransformer uses, so the file
loads into `timm.create_model("vit_base_patch16_224", num_classes=0)` with `strict=True`; what each
objective adds to the encoder (MAE's decoder, a mask token, a SimMIM or BEiT head) is named by the
objective itself (`Objective.pretrain_only_prefixes`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mae_scale.checkpoint.consolidation import consolidate, fp32
from mae_scale.objectives import OBJECTIVES

# Pretraining-only tensors of every objective: what `--with-decoder` keeps and the default drops.
DECODER_PREFIXES = tuple(dict.fromkeys(p for objective in OBJECTIVES.values() for p in objective.pretrain_only_prefixes))


def encoder_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the decoder / head and mask token: what is left carries timm VisionTransformer names."""
    return {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}


def export_weights(src: str | Path, out: str | Path, with_decoder: bool = False) -> dict:
    """Write the fp32 weights of `src` (run dir or checkpoint dir) to the safetensors file `out`.

    Returns a summary: out, checkpoint, step, model, keys, params, format.
    """
    from safetensors.torch import save_file

    from mae_scale.cli_args import check_output_file

    out = check_output_file(out, ".safetensors")  # before minutes of merging partitions, not after
    state, info = consolidate(src)
    if not with_decoder:
        state = encoder_only(state)
    fmt = "mae" if with_decoder else "timm-vit"
    # safetensors refuses views and shared storage: give every tensor its own contiguous memory.
    tensors = {k: fp32(v.detach()).contiguous().clone() for k, v in state.items()}
    metadata = {"format": fmt, "source_checkpoint": info["checkpoint"], "step": str(info["step"]),
                "model": str(info["model"]), "zero_stage": str(info["zero_stage"]),
                "world_size": str(info["world_size"]), "dtype": "float32"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out)  # never a half-written file under the final name
    return {"out": str(out), **info, "format": fmt, "keys": len(tensors),
            "params": sum(t.numel() for t in tensors.values())}
