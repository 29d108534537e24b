"""The encoder SimMIM and BEiT share: a ViT over every token, masked ones replaced by a learned token.

Difference from the papers' ViT-B, on purpose: SimMIM's and BEiT's ViTs use a shared relative
position bias and no absolute position embedding. Here the encoder is timm's ViT layout with an
absolute, learned position embedding (initialised with MAE's fixed 2-D sin-cos table, then
trained), so that its state dict is exactly the encoder of
``timm.models.vision_transformer.VisionTransformer(..., init_values=layer_scale)`` and loads into
the same fine-tuning model as MAE's. Layer scale (0.1) and stochastic depth are as in the papers.

A subclass adds its head after this constructor and then calls ``initialize_weights()``: the
encoder's parameters are registered first, the head's last (ZeRO's optimizer partitions follow
registration order, so it is part of the checkpoint format).

Masks are bool ``[B, L]`` (True = masked, row-major tokens), from ``mae_scale.objectives.masking``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from .patches import run_blocks
from .pos_embed import get_2d_sincos_pos_embed


class MaskedViT(nn.Module):
    """ViT encoder over all tokens, masked ones replaced by ``mask_token`` (timm's state-dict names)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        layer_scale: Optional[float] = 0.1,
        drop_path: float = 0.1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.layer_scale = layer_scale or None  # 0 / None: no layer scale (timm's init_values=None)
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))  # trained (unlike MAE)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = [r.item() for r in torch.linspace(0, drop_path, depth)]  # stochastic depth rule, as timm
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, init_values=self.layer_scale,
                  drop_path=rates[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """timm/BEiT-style init (SimMIM's ViT is BEiT's). Safe to call again, e.g. after ``to_empty``.
        The order of the random draws is part of what a seed means: keep it."""
        table = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.patch_embed.grid_size, cls_token=True)
        with torch.no_grad():
            self.pos_embed.copy_(table.to(self.pos_embed.dtype).unsqueeze(0))
        self.patch_embed.proj.reset_parameters()  # PyTorch's conv default, as BEiT/SimMIM leave it
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)
        self.init_head()
        for layer_id, blk in enumerate(self.blocks, start=1):
            # BEiT's fix_init_weight: shrink each residual branch's output by 1/sqrt(2 * depth index).
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))
            if self.layer_scale is not None:
                blk.ls1.reset_parameters()
                blk.ls2.reset_parameters()

    def init_head(self) -> None:
        """A head that keeps another init than the trunc-normal linear layers get (after those)."""

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ encoder
    def forward_encoder(self, imgs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """imgs [B, C, H, W], mask bool [B, L] or None -> tokens [B, 1+L, D] after the final norm."""
        x = self.patch_embed(imgs)  # [B, L, D]
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}")
            # Replace before cls/pos are added: a masked token then carries only its position.
            w = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+L, D]
        x = x + self.pos_embed
        x = run_blocks(self.blocks, x, self.grad_checkpointing and self.training and torch.is_grad_enabled())
        return self.norm(x)

    def encode_masked(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed precision as in ``mae.py``: the fp32 input is cast to the parameter dtype for the
        network (targets and losses stay fp32). -> (latent [B, 1+L, D], mask bool on the input's device)."""
        mask = mask.to(device=imgs.device, dtype=torch.bool)
        return self.forward_encoder(imgs.to(self.patch_embed.proj.weight.dtype), mask), mask
