"""BEiT-style pretraining (Bao et al., https://arxiv.org/abs/2106.08254) on the shared masked-ViT encoder.

The same encoder as SimMIM, a linear head to a visual vocabulary, cross entropy on the masked
positions only against token ids a tokenizer gives the same crop (``mae_scale.tokenizers``).
Masks: ``mae_scale.objectives.masking.beit_block_mask`` (blockwise, BEiT's Algorithm 1).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masked_vit import MaskedViT


class BEiTPretrain(MaskedViT):
    """Masked-ViT encoder + a linear head over the tokenizer's vocabulary."""

    def __init__(self, vocab_size: Optional[int] = None, **encoder: Any) -> None:
        if not vocab_size:
            raise ValueError("objective 'beit' needs vocab_size (the tokenizer's codebook size)")
        super().__init__(**encoder)
        self.beit_head = nn.Linear(self.pos_embed.shape[-1], vocab_size)
        self.initialize_weights()

    def forward_loss(self, latent: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor
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
        """imgs [B, C, H, W] normalized, mask bool [B, L] (True = masked), target_ids [B, h, w]
        -> (loss fp32 [], logits on the masked positions [M, V] (row-major over the batch), extras)."""
        if target_ids is None:
            raise ValueError("objective 'beit' needs target_ids (token ids from the tokenizer)")
        latent, mask = self.encode_masked(imgs, mask)
        return self.forward_loss(latent, mask, target_ids.to(imgs.device))
