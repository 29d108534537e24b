"""The ViT classifier that fine-tuning and linear probing train: timm's own VisionTransformer.

Using timm's class (rather than a copy) means a fine-tuned mae-scale model *is* a timm model: the
export loads into `timm.create_model(...)` unchanged, and timm's features (drop path, fc_norm,
global average pooling over the patch tokens) are the tested ones. The encoder keys are those of the
MAE pretraining model, so pretrained weights load by name.

- Fine-tuning (MAE appendix A.2): global average pooling of the patch tokens + fc_norm (the final
  norm is dropped), drop path, head initialised with std 2e-5 (as MAE's main_finetune.py does).
- Linear probing (appendix A.3): the cls token after the final norm, a BatchNorm without affine
  parameters before the linear head (std 0.01), every other parameter frozen.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from .vit import VIT_ARCHS


def build_vit_classifier(arch: str, num_classes: int, img_size: int = 224, drop_path_rate: float = 0.0,
                         global_pool: str = "avg", linear_probe: bool = False,
                         layer_scale: float | None = None) -> VisionTransformer:
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; expected one of: {', '.join(VIT_ARCHS)}")
    a = VIT_ARCHS[arch]
    model = VisionTransformer(
        img_size=img_size, patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
        mlp_ratio=a.mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate,
        init_values=layer_scale or None)
    if linear_probe:
        trunc_normal_(model.head.weight, std=0.01)
        nn.init.zeros_(model.head.bias)
        model.head = nn.Sequential(nn.BatchNorm1d(a.embed_dim, affine=False, eps=1e-6), model.head)
        freeze_all_but_head(model)
    else:
        trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return model


def freeze_all_but_head(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")


def encoder_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The encoder's weights under the MAE / timm encoder names (no head, no fc_norm)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
