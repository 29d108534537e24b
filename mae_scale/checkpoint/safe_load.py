"""Loading checkpoint files without ever executing code from them.

DeepSpeed's own loader uses `weights_only=False`; `install_safe_loader` replaces the engine's with
`safe_torch_load`: `weights_only=True`, allowing only the plain DeepSpeed value types its
checkpoints hold (an enum, loss scalers, fragment addresses).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def deepspeed_value_types() -> list:
    """The non-tensor types DeepSpeed puts in its checkpoints; each is plain data, not code."""
    allowed = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    import collections
    allowed += [collections.OrderedDict, set, torch.Size]
    return allowed


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load that refuses to run code: weights_only=True with DeepSpeed's value types allowed."""
    with torch.serialization.safe_globals(deepspeed_value_types()):
        return torch.load(path, map_location=map_location, weights_only=True)


def install_safe_loader(engine) -> None:
    """Make the DeepSpeed engine load its checkpoints with `safe_torch_load`."""
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    checkpoint_engine.load = load
