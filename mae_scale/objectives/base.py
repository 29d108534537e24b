"""What an objective is: everything that differs between MAE, SimMIM and BEiT-style pretraining.

The training loop and the pretraining task know no objective by name; they hold one `Objective`
and call it. An objective owns:

- which `model.*` fields it reads (`reads`; the config refuses or warns about the others), and its
  own config rules (`check`), run when the config is loaded, before anything is created;
- building its model (and what the model needs beside it, e.g. BEiT's tokenizer);
- the masks and loss of one micro-batch, drawn from the micro-batch's `MicroKey` so that a resumed
  run repeats them exactly;
- its picture (reconstructions), its training FLOPs per image (for MFU);
- its loss with per-image fixed masks and its encoder's unmasked features (the monitor,
  `mae_scale.train.monitor`);
- the state-dict prefixes that exist only for pretraining (what `export` drops by default).

Adding one: a file here with the class, a model file in `mae_scale/models/`, an entry in
`OBJECTIVES` (`mae_scale/objectives/__init__.py`), and the name in `ModelConfig.objective`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from PIL import Image

from mae_scale.config_load import ConfigError
from mae_scale.models.vit import VIT_ARCHS, ViTArch
from mae_scale.seeding import MicroKey


class Objective(Protocol):
    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]  # model.* fields it reads besides name, objective, grad_checkpointing
    pretrain_only_prefixes: ClassVar[tuple[str, ...]]  # state-dict keys that are not the encoder
    encoder_sees_masked_tokens: ClassVar[bool]  # False: the encoder runs on the visible patches only (MAE)

    @classmethod
    def encoder_arch(cls, model_name: str) -> ViTArch:
        """The ViT behind `model.name` (ConfigError naming the choices)."""

    @classmethod
    def check(cls, cfg: Any, patch_size: int) -> None:
        """This objective's rules between config fields (ConfigError, one line)."""

    def build_model(self) -> torch.nn.Module:
        """The model, initialised from the current torch seed."""

    def flops_per_image(self, model: torch.nn.Module) -> float:
        """Model FLOPs of one training image, forward + backward."""

    def loss(self, forward, imgs: torch.Tensor, key: MicroKey) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, extras) of one micro-batch of normalized images through `forward` (the engine)."""

    def picture(self, model: torch.nn.Module, imgs: torch.Tensor, key: MicroKey) -> Image.Image:
        """Reconstructions of a few images, one row each."""

    def heldout_loss(self, model: torch.nn.Module, imgs: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """The loss with each image's masks drawn from its own seed (the monitor's held-out loss)."""

    def features(self, model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [B, 1+L, D] (cls first, after the final norm) of unmasked images (k-NN)."""


def encoder_by_name(model_name: str, objective: str) -> ViTArch:
    """The encoders SimMIM and BEiT-style models are named by (`model.name=vit_base_patch16`)."""
    if model_name not in VIT_ARCHS:
        raise ConfigError(f"model.name={model_name!r} is not an encoder for objective {objective}; use one of "
                          f"{', '.join(VIT_ARCHS)}")
    return VIT_ARCHS[model_name]


def refuse_init(cfg: Any, objective: str) -> None:
    """Continued pretraining from `model.init` is MAE's (its decoder and mask token load with it)."""
    if cfg.model.init:
        raise ConfigError(f"model.init is supported for objective mae only (continued MAE pretraining); "
                          f"remove it for objective {objective}")
