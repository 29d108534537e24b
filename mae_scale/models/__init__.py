"""Model definitions for mae-scale: MAE (https://arxiv.org/abs/2111.06377) on ViT encoders."""

from .mae import (
    MODEL_NAMES,
    MaskedAutoencoderViT,
    build_mae,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch4,
    mae_vit_tiny_patch16,
)
from .classifier import build_vit_classifier, encoder_state_dict, freeze_all_but_head
from .pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from .vit import VIT_ARCHS, ViTArch

__all__ = [
    "MODEL_NAMES",
    "MaskedAutoencoderViT",
    "build_mae",
    "mae_vit_tiny_patch16",
    "mae_vit_tiny_patch4",
    "build_vit_classifier",
    "encoder_state_dict",
    "freeze_all_but_head",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
    "get_2d_sincos_pos_embed",
    "interpolate_pos_embed",
    "VIT_ARCHS",
    "ViTArch",
]
