"""Images <-> flattened patches, and running a stack of ViT blocks: shared by every objective, the
tokenizer and the pictures, so there is one definition of a patch's layout."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> patches [N, L, p*p*C], each patch flattened in (p, q, c) order (MAE's)."""
    n, c, h_px, w_px = imgs.shape
    if h_px % p or w_px % p:
        raise ValueError(f"image size {(h_px, w_px)} is not divisible by patch size {p}")
    h, w = h_px // p, w_px // p
    x = imgs.reshape(n, c, h, p, w, p)  # [N, C, h, p, w, q]
    x = torch.einsum("nchpwq->nhwpqc", x)  # [N, h, w, p, q, C]
    return x.reshape(n, h * w, p * p * c)  # [N, L, p*p*C]


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """patches [N, L, p*p*C] on a `grid` of (h, w) patches -> imgs [N, C, H, W]."""
    h, w = grid
    if x.shape[1] != h * w:
        raise ValueError(f"expected {h * w} patches for grid {(h, w)}, got {x.shape[1]}")
    x = x.reshape(x.shape[0], h, w, p, p, channels)  # [N, h, w, p, q, C]
    x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, h, p, w, q]
    return x.reshape(x.shape[0], channels, h * p, w * p)  # [N, C, H, W]


def token_mask_to_pixels(mask: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """A per-token mask [N, L] (row-major over `grid`) -> a float pixel mask [N, 1, H, W]."""
    h, w = grid
    return mask.reshape(-1, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3).float()


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """x through the blocks; with `grad_checkpointing` (in training, with grad) each block is
    recomputed in backward instead of storing its activations (large ViT-H batches)."""
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if grad_checkpointing else blk(x)
    return x
