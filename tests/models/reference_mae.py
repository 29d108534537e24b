"""A plain, independent MAE used only as a numerical reference in tests.

Written as directly as possible from the semantics of MAE (https://arxiv.org/abs/2111.06377) and its
published code: numpy sin-cos tables, explicit softmax(q k^T * scale) attention (no fused kernels, no
timm), explicit patchify loops over the patch grid, masking by sorting noise. Module names follow the
published checkpoint layout so the same state dict loads strictly into both implementations.
Deliberately slow and simple; it is never used for training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- sin-cos (numpy, float64)
def sincos_1d(dim, positions):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim, grid_h, grid_w, cls_token=True):
    """Row k = patch (i, j) in raster order; first half of channels encodes the column j."""
    rows = []
    for i in range(grid_h):
        for j in range(grid_w):
            rows.append((j, i))
    coords = np.array(rows, dtype=np.float64)  # [L, 2] = (column, row)
    table = np.concatenate([sincos_1d(dim // 2, coords[:, 0]), sincos_1d(dim // 2, coords[:, 1])], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table


# ---------------------------------------------------------------- transformer pieces
class RefAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        hd = d // self.num_heads
        qkv = self.qkv(x)
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        heads = []
        for h in range(self.num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)  # [N, T, T]
            heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])  # [N, T, hd]
        return self.proj(torch.cat(heads, dim=-1))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, L, D]


# ---------------------------------------------------------------- MAE
class ReferenceMAE(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                 decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio=4.0, norm_pix_loss=False):
        super().__init__()
        self.p = patch_size
        self.grid = img_size // patch_size
        self.norm_pix_loss = norm_pix_loss
        n_pos = self.grid * self.grid + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.tensor(sincos_2d(embed_dim, self.grid, self.grid), dtype=torch.float32)[None],
            requires_grad=False,
        )
        self.patch_embed = RefPatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList([RefBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.tensor(sincos_2d(decoder_embed_dim, self.grid, self.grid), dtype=torch.float32)[None],
            requires_grad=False,
        )
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            [RefBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        assert n_pos == self.pos_embed.shape[1]

    def patchify(self, imgs):
        """Patch (i, j) -> vector of pixels in (row-in-patch, col-in-patch, channel) order."""
        p, g = self.p, self.grid
        out = []
        for i in range(g):
            for j in range(g):
                patch = imgs[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # [N, C, p, p]
                out.append(patch.permute(0, 2, 3, 1).reshape(imgs.shape[0], -1))
        return torch.stack(out, dim=1)  # [N, L, p*p*C]

    def forward(self, imgs, mask_ratio, noise):
        n = imgs.shape[0]
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        length, dim = x.shape[1], x.shape[2]
        keep = int(length * (1 - mask_ratio))

        order = torch.argsort(noise, dim=1)  # smallest noise first
        mask = torch.ones(n, length)
        visible = []
        for b in range(n):
            kept = order[b, :keep]
            mask[b, kept] = 0.0
            visible.append(x[b, kept])
        x = torch.stack(visible)  # [N, keep, D]

        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, 1, dim)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)

        # Decoder: scatter encoded tokens back to their positions; the rest get the mask token.
        y = self.decoder_embed(x)
        dd = y.shape[-1]
        full = []
        for b in range(n):
            seq = self.mask_token[0].expand(length, dd).clone()
            seq[order[b, :keep]] = y[b, 1:]
            full.append(seq)
        y = torch.cat([y[:, :1], torch.stack(full)], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]

        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, unbiased=True, keepdim=True)
            target = (target - mean) / torch.sqrt(var + 1e-6)
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred, mask
