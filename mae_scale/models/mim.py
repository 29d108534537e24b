"""SimMIM and BEiT-style masked image modelling on a ViT that sees every token.

- SimMIM (Xie et al., https://arxiv.org/abs/2111.09886): masked tokens are replaced by one learned
  mask token, the encoder runs over all tokens, a 1x1 conv maps each token to its p*p*3 pixels and
  PixelShuffle(p) lays them back out as an image; the loss is L1 on the masked pixels only, against
  the (ImageNet-)normalized input, summed and divided by (masked pixels x 3), as SimMIM's code does.
- BEiT (Bao et al., https://arxiv.org/abs/2106.08254): the same encoder, a linear head to a visual
  vocabulary, cross entropy on the masked positions only against token ids from a tokenizer over
  the same crop (``mae_scale.tokenizer``).

Masks come from ``mae_scale.masking`` as bool ``[B, L]`` (True = masked, row-major tokens).

Difference from the papers' ViT-B, on purpose: SimMIM's and BEiT's ViTs use a shared relative
position bias and no absolute position embedding. Here the encoder is timm's ViT layout with an
absolute, learned position embedding (initialised with MAE's fixed 2-D sin-cos table, then
trained), so that its state dict is exactly the encoder of
``timm.models.vision_transformer.VisionTransformer(..., init_values=layer_scale)`` and loads into
the same fine-tuning model as MAE's. Layer scale (0.1) and stochastic depth are as in the papers.

Mixed precision: as in ``mae.py``, ``forward`` casts the fp32 input to the parameter dtype for the
network and computes targets and losses in fp32.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from .patches import run_blocks, token_mask_to_pixels
from .pos_embed import get_2d_sincos_pos_embed
from .vit import VIT_ARCHS

MIM_OBJECTIVES: Tuple[str, ...] = ("simmim", "beit")


class MaskedImageViT(nn.Module):
    """ViT encoder over all tokens (masked ones replaced by ``mask_token``) + a SimMIM or BEiT head."""

    def __init__(
        self,
        objective: str = "simmim",
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        vocab_size: Optional[int] = None,
        layer_scale: Optional[float] = 0.1,
        drop_path: float = 0.1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if objective not in MIM_OBJECTIVES:
            raise ValueError(f"unknown MIM objective {objective!r}; expected one of: {', '.join(MIM_OBJECTIVES)}")
        if objective == "beit" and not vocab_size:
            raise ValueError("objective 'beit' needs vocab_size (the tokenizer's codebook size)")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.objective = objective
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.layer_scale = layer_scale or None  # 0 / None: no layer scale (timm's init_values=None)
        self.grad_checkpointing = grad_checkpointing

        # --- encoder: timm VisionTransformer names ---
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

        # --- head ---
        if objective == "simmim":
            # One linear map per token to its p*p*3 pixels; PixelShuffle puts them back in place.
            self.simmim_head = nn.Conv2d(embed_dim, patch_size**2 * in_chans, kernel_size=1)
            self.pixel_shuffle = nn.PixelShuffle(patch_size)
        else:
            self.beit_head = nn.Linear(embed_dim, vocab_size)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """timm/BEiT-style init (SimMIM's ViT is BEiT's). Safe to call again, e.g. after ``to_empty``."""
        table = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.patch_embed.grid_size, cls_token=True)
        with torch.no_grad():
            self.pos_embed.copy_(table.to(self.pos_embed.dtype).unsqueeze(0))
        self.patch_embed.proj.reset_parameters()  # PyTorch's conv default, as BEiT/SimMIM leave it
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)
        if self.objective == "simmim":
            self.simmim_head.reset_parameters()  # SimMIM's decoder conv keeps PyTorch's default init
        for layer_id, blk in enumerate(self.blocks, start=1):
            # BEiT's fix_init_weight: shrink each residual branch's output by 1/sqrt(2 * depth index).
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))
            if self.layer_scale is not None:
                blk.ls1.reset_parameters()
                blk.ls2.reset_parameters()

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

    # ------------------------------------------------------------------ heads and losses
    def forward_simmim(self, imgs: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """latent [B, 1+L, D] -> (L1 loss fp32 on masked pixels, reconstruction [B, C, H, W] fp32)."""
        b, _, d = latent.shape
        h, w = self.patch_embed.grid_size
        z = latent[:, 1:].transpose(1, 2).reshape(b, d, h, w)  # [B, D, h, w]
        rec = self.pixel_shuffle(self.simmim_head(z)).float()  # [B, C, H, W]
        p = self.patch_size
        pix_mask = token_mask_to_pixels(mask, p, (h, w))  # [B, 1, H, W]
        l1 = F.l1_loss(rec, imgs.float(), reduction="none")  # [B, C, H, W]
        loss = (l1 * pix_mask).sum() / (pix_mask.sum() + 1e-5) / self.in_chans
        return loss, rec

    def forward_beit(self, latent: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """latent [B, 1+L, D] -> (CE fp32 on masked tokens, logits [M, V] fp32, {"masked_acc"})."""
        b = latent.shape[0]
        targets = target_ids.reshape(b, -1)  # [B, L]
        if targets.shape != mask.shape:
            raise ValueError(f"target_ids {tuple(target_ids.shape)} do not match the mask {tuple(mask.shape)}")
        logits = self.beit_head(latent[:, 1:][mask]).float()  # [M, V], M = masked tokens in the batch
        labels = targets[mask].long()  # [M]
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean().detach()
        return loss, logits, {"masked_acc": acc}

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, target_ids: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """imgs [B, C, H, W] normalized, mask bool [B, L] (True = masked), target_ids [B, h, w] (beit)
        -> (loss fp32 [], output, extras). SimMIM output: reconstructed images [B, C, H, W];
        BEiT output: logits on the masked positions [M, V] (row-major over the batch)."""
        mask = mask.to(device=imgs.device, dtype=torch.bool)
        latent = self.forward_encoder(imgs.to(self.patch_embed.proj.weight.dtype), mask)
        if self.objective == "simmim":
            loss, rec = self.forward_simmim(imgs, latent, mask)
            return loss, rec, {}
        if target_ids is None:
            raise ValueError("objective 'beit' needs target_ids (token ids from the tokenizer)")
        return self.forward_beit(latent, mask, target_ids.to(imgs.device))


def build_mim(arch: str, objective: str, **kwargs: Any) -> MaskedImageViT:
    """SimMIM / BEiT model on the ``VIT_ARCHS[arch]`` encoder; ``kwargs`` (img_size, vocab_size,
    layer_scale, drop_path, grad_checkpointing) go to :class:`MaskedImageViT`."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; expected one of: {', '.join(VIT_ARCHS)}")
    return MaskedImageViT(objective=objective, **{**VIT_ARCHS[arch].kwargs(), **kwargs})
