"""SimMIM (Xie et al., https://arxiv.org/abs/2111.09886) on the shared masked-ViT encoder.

Masked tokens are replaced by one learned mask token, the encoder runs over all tokens, a 1x1 conv
maps each token to its p*p*3 pixels and PixelShuffle(p) lays them back out as an image; the loss is
L1 on the masked pixels only, against the (ImageNet-)normalized input, summed and divided by
(masked pixels x 3), as SimMIM's code does. Masks: ``mae_scale.objectives.masking.simmim_mask``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masked_vit import MaskedViT
from .patches import token_mask_to_pixels


class SimMIM(MaskedViT):
    """Masked-ViT encoder + SimMIM's linear pixel head."""

    def __init__(self, vocab_size: Optional[int] = None, **encoder: Any) -> None:
        super().__init__(**encoder)
        embed_dim, p = self.pos_embed.shape[-1], self.patch_size
        # One linear map per token to its p*p*3 pixels; PixelShuffle puts them back in place.
        self.simmim_head = nn.Conv2d(embed_dim, p**2 * self.in_chans, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(p)
        self.initialize_weights()

    def init_head(self) -> None:
        self.simmim_head.reset_parameters()  # SimMIM's decoder conv keeps PyTorch's default init

    def forward_loss(self, imgs: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """latent [B, 1+L, D] -> (L1 loss fp32 on masked pixels, reconstruction [B, C, H, W] fp32)."""
        b, _, d = latent.shape
        h, w = self.patch_embed.grid_size
        z = latent[:, 1:].transpose(1, 2).reshape(b, d, h, w)  # [B, D, h, w]
        rec = self.pixel_shuffle(self.simmim_head(z)).float()  # [B, C, H, W]
        pix_mask = token_mask_to_pixels(mask, self.patch_size, (h, w))  # [B, 1, H, W]
        l1 = F.l1_loss(rec, imgs.float(), reduction="none")  # [B, C, H, W]
        loss = (l1 * pix_mask).sum() / (pix_mask.sum() + 1e-5) / self.in_chans
        return loss, rec

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, target_ids: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """imgs [B, C, H, W] normalized, mask bool [B, L] (True = masked) -> (loss fp32 [],
        reconstructed images [B, C, H, W] fp32, {}). `target_ids` is not read (one call shape for
        both MIM heads)."""
        latent, mask = self.encode_masked(imgs, mask)
        loss, rec = self.forward_loss(imgs, latent, mask)
        return loss, rec, {}
