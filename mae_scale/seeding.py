"""Derived seeds for every random draw a resumed run must reproduce.

Nothing a resume needs may hang on RNG state that only rank 0 would save: the masks, drop path,
mixup and erasing of a micro-batch are drawn from seeds derived from (seed, step, rank, micro-batch)
and a constant naming the stream, so an interrupted run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """timm's Mixup draws from numpy, RandomErasing from `random` and torch, drop path from torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class MicroKey:
    """Which micro-batch of the run this is: every draw of its step derives from these."""

    seed: int
    step: int
    rank: int
    micro: int

    def seed_for(self, *stream: int) -> int:
        """The seed of one stream of draws (masks, drop path, ...) of this micro-batch."""
        return derived_seed(self.seed, self.step, self.rank, self.micro, *stream)
