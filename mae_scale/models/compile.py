"""`torch.compile` of a model's transformer blocks, in place.

Compiling block by block (not the whole model) keeps what changes from step to step (masking,
the number of kept tokens, DeepSpeed's hooks around the model) outside the compiled graphs, and
`Module.compile()` compiles in place, so parameter names, their registration order (which ZeRO's
partitions follow) and therefore checkpoints stay exactly those of the eager model.
"""

from __future__ import annotations

from torch import nn
from timm.models.vision_transformer import Block


def compile_blocks(model: nn.Module) -> int:
    """Compile every timm transformer block of `model` (encoder and decoder alike); returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)
