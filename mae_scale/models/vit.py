"""Vision Transformer encoder sizes shared by the masked-image-modelling objectives.

The encoder shapes are those of ViT (Dosovitskiy et al., https://arxiv.org/abs/2010.11929) as used by
MAE (https://arxiv.org/abs/2111.06377): base/16, large/16, huge/14, plus a tiny one that only exists
so tests run in seconds on a CPU. Each objective (MAE now; SimMIM and BEiT later) adds its own head or
decoder on top of one of these, so the encoder a checkpoint holds is named the same way everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class ViTArch:
    """Shape of a ViT encoder (all blocks pre-norm, qkv bias, LayerNorm eps 1e-6)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    def kwargs(self) -> Dict[str, Any]:
        return asdict(self)


VIT_ARCHS: Dict[str, ViTArch] = {
    # Not a published size: 4 blocks keep the CPU tests fast while still exercising depth.
    "vit_tiny_patch16": ViTArch(patch_size=16, embed_dim=192, depth=4, num_heads=3),
    # Not a published size either: 4-px patches for 28 px images (the Fashion-MNIST recipe, on CPU).
    "vit_tiny_patch4": ViTArch(patch_size=4, embed_dim=128, depth=6, num_heads=4),
    "vit_base_patch16": ViTArch(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": ViTArch(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": ViTArch(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
