"""SimMIM (Xie et al., https://arxiv.org/abs/2111.09886): L1 on the masked pixels, a mask token in
the encoder, a linear head. Model: `mae_scale.models.simmim`; masks: `masking.simmim_mask`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mae_scale.config_load import ConfigError
from mae_scale.models.mim import build_mim
from mae_scale.objectives.base import refuse_init
from mae_scale.objectives.mask_token import MaskTokenObjective
from mae_scale.objectives.masking import simmim_mask
from mae_scale.seeding import MicroKey
from mae_scale.speed import mim_train_flops
from mae_scale.visualize import simmim_grid


class SimMIM(MaskTokenObjective):
    name = "simmim"
    reads = ("mask_ratio", "mask_patch_size", "layer_scale", "drop_path")
    pretrain_only_prefixes = ("mask_token", "simmim_head.")

    @classmethod
    def check(cls, cfg: Any, patch_size: int) -> None:
        m, size = cfg.model, cfg.data.input_size
        if m.mask_patch_size % patch_size or size % m.mask_patch_size:
            raise ConfigError(f"model.mask_patch_size={m.mask_patch_size} must be a multiple of the patch size "
                              f"{patch_size} and divide data.input_size={size}")
        refuse_init(cfg, cls.name)

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        model = build_mim(m.name, self.name, img_size=self.cfg.data.input_size, layer_scale=m.layer_scale,
                          drop_path=m.drop_path, grad_checkpointing=m.grad_checkpointing)
        self.patch_size = model.patch_size
        return model

    def flops_per_image(self, model: torch.nn.Module) -> float:
        return mim_train_flops(model, 1, masked_tokens=0)  # the head predicts every patch

    def draw_mask(self, rng: np.random.Generator) -> np.ndarray:
        """One image's mask [h, w] from `rng`."""
        m = self.cfg.model
        return simmim_mask(rng, self.cfg.data.input_size, m.mask_patch_size, self.patch_size, m.mask_ratio)

    def picture(self, model: torch.nn.Module, imgs: torch.Tensor, key: MicroKey):
        return simmim_grid(model, imgs, self.masks(key, imgs.shape[0], imgs.device))
