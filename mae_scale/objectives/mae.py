"""MAE (He et al., https://arxiv.org/abs/2111.06377): the pixels of removed patches, the encoder on
the visible patches only. Model: `mae_scale.models.mae` (reads like the paper); the random masking
is the model's own, from noise [B, L] drawn here per micro-batch."""

from __future__ import annotations

from typing import Any

import torch

from mae_scale.config_load import ConfigError
from mae_scale.models import MODEL_NAMES, VIT_ARCHS, build_mae
from mae_scale.seeding import MicroKey
from mae_scale.speed import mae_train_flops
from mae_scale.visualize import reconstruction_grid


class MAE:
    name = "mae"
    reads = ("mask_ratio", "norm_pix_loss")
    pretrain_only_prefixes = ("decoder_", "mask_token")
    encoder_sees_masked_tokens = False

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def encoder_arch(cls, model_name: str):
        if model_name not in MODEL_NAMES:
            raise ConfigError(f"model.name={model_name!r} is not an MAE model; use one of {', '.join(MODEL_NAMES)}")
        return VIT_ARCHS[model_name.removeprefix("mae_")]  # every MAE preset is `mae_` + its encoder's name

    @classmethod
    def check(cls, cfg: Any, patch_size: int) -> None:
        m, size = cfg.model, cfg.data.input_size
        patches = (size // patch_size) ** 2
        if int(patches * (1 - m.mask_ratio)) < 1:
            raise ConfigError(f"model.mask_ratio={m.mask_ratio} leaves no visible patch of the {patches} at "
                              f"data.input_size={size}; lower it or use a larger input")

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        model = build_mae(m.name, img_size=self.cfg.data.input_size, norm_pix_loss=m.norm_pix_loss,
                          grad_checkpointing=m.grad_checkpointing)
        self.num_patches = model.patch_embed.num_patches
        return model

    def flops_per_image(self, model: torch.nn.Module) -> float:
        return mae_train_flops(model, 1, self.cfg.model.mask_ratio)

    def noise(self, batch: int, seed: int, device: torch.device) -> torch.Tensor:
        """Masking noise [B, L] from one seed: the same masks on every replay of the step."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.rand(batch, self.num_patches, generator=gen, device=device)

    def loss(self, forward, imgs: torch.Tensor, key: MicroKey):
        noise = self.noise(imgs.shape[0], key.seed_for(), imgs.device)
        loss, _, _ = forward(imgs, mask_ratio=self.cfg.model.mask_ratio, noise=noise)
        return loss, {}

    def heldout_loss(self, model: torch.nn.Module, imgs: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        # noise per image from its own seed, drawn on the CPU: the same masks on any device and split
        noise = torch.stack([torch.rand(self.num_patches, generator=torch.Generator().manual_seed(s)) for s in seeds])
        loss, _, _ = model(imgs, mask_ratio=self.cfg.model.mask_ratio, noise=noise.to(imgs.device))
        return loss

    def features(self, model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        # every patch kept, in order (ascending noise), so no random draw is made
        order = torch.arange(self.num_patches, dtype=torch.float32, device=imgs.device).expand(imgs.shape[0], -1)
        tokens, _, _ = model.forward_encoder(imgs.to(model.patch_embed.proj.weight.dtype), 0.0, order)
        return tokens

    def picture(self, model: torch.nn.Module, imgs: torch.Tensor, key: MicroKey):
        # the run's seed itself: the same masks in every picture of the run, so they compare
        noise = self.noise(imgs.shape[0], key.seed, imgs.device)
        return reconstruction_grid(model, imgs, self.cfg.model.mask_ratio, noise)
