"""BEiT-style (Bao et al., https://arxiv.org/abs/2106.08254): cross entropy on a tokenizer's ids of
blockwise-masked patches. Model: `mae_scale.models.beit`; masks: `masking.beit_block_mask`;
tokenizers: `mae_scale.tokenizers` (read when the model is built, before any step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_scale.config_load import ConfigError
from mae_scale.models.mim import build_mim
from mae_scale.objectives.base import refuse_init
from mae_scale.objectives.mask_token import MaskTokenObjective
from mae_scale.objectives.masking import beit_block_mask
from mae_scale.seeding import MicroKey
from mae_scale.speed import mim_train_flops
from mae_scale.visualize import beit_grid
from mae_scale.weights import WeightsError


class BEiT(MaskTokenObjective):
    name = "beit"
    reads = ("num_masking_patches", "min_block_patches", "tokenizer", "layer_scale", "drop_path")
    pretrain_only_prefixes = ("mask_token", "beit_head.")

    @classmethod
    def check(cls, cfg: Any, patch_size: int) -> None:
        m = cfg.model
        tokens = (cfg.data.input_size // patch_size) ** 2
        if not m.num_masking_patches < tokens or not m.min_block_patches <= m.num_masking_patches:
            raise ConfigError(f"model.num_masking_patches={m.num_masking_patches} must be in [1, {tokens}) and "
                              f"model.min_block_patches={m.min_block_patches} in [1, num_masking_patches]")
        if not m.tokenizer or not Path(m.tokenizer).is_file():
            raise ConfigError(f"model.tokenizer={m.tokenizer!r} is not a file; make one with `mae-scale tokenizer fit "
                              "SHARDS --vocab 8192 --out tok.safetensors` (or use a BEiT v2 VQ-KD .pth or a DALL-E "
                              "dVAE encoder state dict) and point model.tokenizer at it")
        refuse_init(cfg, cls.name)

    def build_model(self) -> torch.nn.Module:
        from mae_scale.tokenizers import load_tokenizer

        m = self.cfg.model
        try:
            self.tokenizer = load_tokenizer(m.tokenizer)
        except ValueError as exc:  # a file that is not a tokenizer: one line, before any step
            raise WeightsError(f"model.tokenizer: {exc}") from None
        model = build_mim(m.name, self.name, img_size=self.cfg.data.input_size, vocab_size=self.tokenizer.vocab_size,
                          layer_scale=m.layer_scale, drop_path=m.drop_path, grad_checkpointing=m.grad_checkpointing)
        if self.tokenizer.patch_size != model.patch_size:
            raise WeightsError(f"the tokenizer {m.tokenizer} works on {self.tokenizer.patch_size}-px patches but "
                               f"{m.name} has {model.patch_size}-px patches; fit one with --patch-size {model.patch_size}")
        self.token_grid = tuple(model.patch_embed.grid_size)
        return model

    def flops_per_image(self, model: torch.nn.Module) -> float:
        return mim_train_flops(model, 1, masked_tokens=self.cfg.model.num_masking_patches)

    def draw_mask(self, rng: np.random.Generator) -> np.ndarray:
        """One image's mask [h, w] from `rng`."""
        m = self.cfg.model
        return beit_block_mask(rng, self.token_grid, m.num_masking_patches, m.min_block_patches)

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The tokenizer's ids of the same crop [B, h, w]; the model's extras then carry masked_acc,
        the share of masked tokens whose id it guesses."""
        return self.tokenizer.encode(imgs)

    def picture(self, model: torch.nn.Module, imgs: torch.Tensor, key: MicroKey):
        return beit_grid(model, imgs, self.masks(key, imgs.shape[0], imgs.device), self.tokenizer)
