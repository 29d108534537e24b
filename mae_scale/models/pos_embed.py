"""Fixed 2-D sine-cosine position embeddings and their resizing.

MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377)
uses frozen 2-D sin-cos position embeddings in both encoder and decoder. The layout here follows the
published MAE code bit for bit, so that the published checkpoints (which store these tables) agree with
the ones we compute:

* the grid is built with ``meshgrid(w, h)`` in "xy" order, so ``grid[0]`` holds the *column* index and
  ``grid[1]`` the *row* index;
* the first half of the channels encodes ``grid[0]``, the second half ``grid[1]``;
* each half is ``concat(sin(pos * omega), cos(pos * omega))`` with ``omega_i = 1 / 10000 ** (i / (D/4))``;
* a leading all-zero row is the class token's position.

The tables are computed in float64 and cast at the end so that every run, device and dtype starts from
the same numbers.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F

GridSize = Union[int, Tuple[int, int]]


def _as_hw(grid_size: GridSize) -> Tuple[int, int]:
    if isinstance(grid_size, int):
        return grid_size, grid_size
    h, w = grid_size
    return int(h), int(w)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos table for positions ``pos`` (any shape, flattened to M values) -> [M, embed_dim]."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for a 1-D sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device="cpu")
    omega = 1.0 / 10000 ** (omega / (embed_dim / 2.0))  # [D/2]
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: GridSize, cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table, float64 on CPU: [gh*gw, D], or [1 + gh*gw, D] with a zero cls row first."""
    if embed_dim % 4 != 0:
        # Each of the two axes takes half the channels and splits them again into sin and cos.
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = _as_hw(grid_size)
    grid_h = torch.arange(gh, dtype=torch.float64, device="cpu")
    grid_w = torch.arange(gw, dtype=torch.float64, device="cpu")
    # MAE's order: meshgrid(w, h) with "xy" indexing -> both [gh, gw]; grid[0] varies along columns.
    grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0)  # [2, gh, gw]
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # [gh*gw, D/2]
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # [gh*gw, D/2]
    pos_embed = torch.cat([emb_a, emb_b], dim=1)  # [gh*gw, D]
    if cls_token:
        pos_embed = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64, device="cpu"), pos_embed], dim=0)
    return pos_embed


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: GridSize,
    num_extra_tokens: int = 1,
    old_grid: GridSize | None = None,
) -> torch.Tensor:
    """Resize a checkpoint's position embedding [1, extra + L_old, D] to a new patch grid.

    Used when fine-tuning at a resolution (or patch size) other than pre-training. The leading
    ``num_extra_tokens`` rows (the cls token) are kept as they are; the patch rows are reshaped to
    their grid and resized with bicubic interpolation (``align_corners=False``, as MAE's fine-tuning
    code does). ``old_grid`` defaults to a square grid. Returns the input unchanged when the grid
    already matches.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected pos_embed of shape [1, tokens, dim], got {tuple(pos_embed.shape)}")
    n_tokens, dim = pos_embed.shape[1], pos_embed.shape[2]
    n_patches_old = n_tokens - num_extra_tokens
    if old_grid is None:
        side = int(round(n_patches_old**0.5))
        if side * side != n_patches_old:
            raise ValueError(f"cannot infer a square grid from {n_patches_old} patch positions; pass old_grid")
        old_grid = (side, side)
    oh, ow = _as_hw(old_grid)
    nh, nw = _as_hw(new_grid)
    if oh * ow != n_patches_old:
        raise ValueError(f"old_grid {(oh, ow)} does not match {n_patches_old} patch positions")
    if (oh, ow) == (nh, nw):
        return pos_embed

    extra = pos_embed[:, :num_extra_tokens]  # [1, E, D]
    patches = pos_embed[:, num_extra_tokens:].reshape(1, oh, ow, dim).permute(0, 3, 1, 2)  # [1, D, oh, ow]
    # Bicubic in float32: CPU bicubic has no bf16/fp16 kernel, and the table is small.
    patches = F.interpolate(patches.float(), size=(nh, nw), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(pos_embed.dtype)  # [1, nh*nw, D]
    return torch.cat([extra, patches], dim=1)
