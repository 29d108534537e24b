"""The models whose encoder sees every token (masked ones replaced by a learned token), by name:
SimMIM (`simmim.py`) and BEiT-style (`beit.py`), over the one encoder of `masked_vit.py`."""

from __future__ import annotations

from typing import Any, Dict, Tuple, Type

from .beit import BEiTPretrain
from .masked_vit import MaskedViT
from .simmim import SimMIM
from .vit import VIT_ARCHS

MaskedImageViT = MaskedViT  # the type both heads share
MIM_MODELS: Dict[str, Type[MaskedViT]] = {"simmim": SimMIM, "beit": BEiTPretrain}
MIM_OBJECTIVES: Tuple[str, ...] = tuple(MIM_MODELS)


def build_mim(arch: str, objective: str, **kwargs: Any) -> MaskedViT:
    """SimMIM / BEiT model on the ``VIT_ARCHS[arch]`` encoder; ``kwargs`` (img_size, vocab_size,
    layer_scale, drop_path, grad_checkpointing) go to the model."""
    if objective not in MIM_MODELS:
        raise ValueError(f"unknown MIM objective {objective!r}; expected one of: {', '.join(MIM_MODELS)}")
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; expected one of: {', '.join(VIT_ARCHS)}")
    return MIM_MODELS[objective](**{**VIT_ARCHS[arch].kwargs(), **kwargs})
