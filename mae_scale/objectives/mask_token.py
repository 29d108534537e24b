"""What SimMIM and BEiT-style share: the encoder sees every token, masked ones replaced by a learned
token (`mae_scale.models.masked_vit`), with a mask per image drawn on the host.

A subclass names its mask (`draw_mask`), its targets beside the image (`targets`: BEiT's token
ids; none for SimMIM) and the rest an objective owns. Draw order within a micro-batch, part of
what a resume repeats: the drop-path seed, the masks, the targets, the forward.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from mae_scale.objectives.base import encoder_by_name
from mae_scale.objectives.masking import masks_for, masks_from_seeds, seed_drop_path
from mae_scale.seeding import MicroKey


class MaskTokenObjective:
    name = ""
    encoder_sees_masked_tokens = True

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def encoder_arch(cls, model_name: str):
        return encoder_by_name(model_name, cls.name)

    def draw_mask(self, rng: np.random.Generator) -> np.ndarray:
        """One image's mask [h, w] from `rng`."""
        raise NotImplementedError

    def targets(self, imgs: torch.Tensor) -> Optional[torch.Tensor]:
        """What the model predicts beside the pixels it sees (None: the pixels themselves)."""
        return None

    def masks(self, key: MicroKey, batch: int, device: torch.device) -> torch.Tensor:
        return masks_for(key, batch, device, self.draw_mask)

    def loss(self, forward, imgs: torch.Tensor, key: MicroKey):
        seed_drop_path(key)
        masks = self.masks(key, imgs.shape[0], imgs.device)
        loss, _, extras = forward(imgs, masks, self.targets(imgs))
        return loss, extras

    def heldout_loss(self, model: torch.nn.Module, imgs: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        masks = masks_from_seeds(seeds, imgs.device, self.draw_mask)
        return model(imgs, masks, self.targets(imgs))[0]

    def features(self, model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        return model.forward_encoder(imgs.to(model.patch_embed.proj.weight.dtype))
