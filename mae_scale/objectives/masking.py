"""Mask generators for the masked-image-modelling objectives that keep every token in the encoder.

MAE drops tokens (its random masking lives in ``models/mae.py``, from noise ``mae.py`` here draws). SimMIM and BEiT instead replace
the masked tokens by a learned mask token, so they need a boolean mask over the token grid, drawn
per image on the host (in the data path or the step) and passed to the model as ``[B, L]``.

- :func:`simmim_mask`: SimMIM (Xie et al., https://arxiv.org/abs/2111.09886), as its
  ``MaskGenerator``: the image is cut into ``mask_patch_size`` cells (32 px), ``ceil(cells *
  ratio)`` of them are masked uniformly at random, and each cell covers ``(32 / 16) ** 2`` tokens.
- :func:`beit_block_mask`: BEiT (Bao et al., https://arxiv.org/abs/2106.08254, Algorithm 1):
  rectangles of 16..75 patches with a log-uniform aspect ratio in [0.3, 1/0.3] are added until
  exactly ``num_masking`` patches are masked. BEiT's reference ``MaskingGenerator`` gives up after
  10 failed proposals and may return fewer; here the end game enumerates every admissible
  rectangle instead (see :func:`beit_block_mask_with_blocks`), so the count is always exact.

Every generator takes a ``numpy.random.Generator`` so a mask is a pure function of its seed.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from mae_scale.seeding import MicroKey

Block = Tuple[int, int, int, int]  # (top, left, h, w) in tokens

__all__ = ["simmim_mask", "beit_block_mask", "beit_block_mask_with_blocks", "mask_batch", "masks_for", "masks_from_seeds", "seed_drop_path"]

# Streams of a micro-batch's draws (`MicroKey.seed_for`): the masks' numpy generator, and torch's
# global generator, which drop path draws from.
MASK_STREAM = 0x313
DROP_PATH_STREAM = 0xD5


def simmim_mask(
    rng: np.random.Generator,
    input_size: int = 224,
    mask_patch_size: int = 32,
    model_patch_size: int = 16,
    mask_ratio: float = 0.6,
) -> np.ndarray:
    """bool [input_size // model_patch_size] * 2: True = masked token (row-major token grid)."""
    if input_size % mask_patch_size or mask_patch_size % model_patch_size:
        raise ValueError(
            f"SimMIM mask needs input_size ({input_size}) divisible by mask_patch_size "
            f"({mask_patch_size}) and mask_patch_size divisible by model_patch_size ({model_patch_size})")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    cells = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    # ceil as SimMIM's np.ceil; rounding to 9 digits first keeps a product that should be an
    # integer but comes out a hair above it in floating point (0.1 * 3 = 0.30000000000000004)
    # from gaining a cell.
    count = math.ceil(round(cells * cells * mask_ratio, 9))
    cell_mask = np.zeros(cells * cells, dtype=bool)
    cell_mask[rng.permutation(cells * cells)[:count]] = True
    cell_mask = cell_mask.reshape(cells, cells)
    return cell_mask.repeat(scale, axis=0).repeat(scale, axis=1)


def _admissible_shapes(
    grid: Tuple[int, int], min_block: int, max_block: int, min_aspect: float, max_aspect: float
) -> List[Tuple[int, int]]:
    """Every (h, w) whose area and aspect h / w lie within the limits (and that fits, as in BEiT)."""
    height, width = grid
    return [
        (h, w)
        for h in range(1, height)
        for w in range(1, width)
        if min_block <= h * w <= max_block and min_aspect <= h / w <= max_aspect
    ]


def _end_game(
    rng: np.random.Generator, mask: np.ndarray, shapes: List[Tuple[int, int]], remaining: int
) -> Optional[Block]:
    """A rectangle drawn uniformly among those adding ``remaining`` new patches (else 1..remaining)."""
    height, width = mask.shape
    # prefix[i, j] = masked patches in mask[:i, :j]; a rectangle's count is four look-ups.
    prefix = np.zeros((height + 1, width + 1), dtype=np.int64)
    prefix[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    exact: List[Block] = []
    partial: List[Block] = []
    for h, w in shapes:
        tops, lefts = np.meshgrid(np.arange(height - h + 1), np.arange(width - w + 1), indexing="ij")
        masked = (prefix[tops + h, lefts + w] - prefix[tops, lefts + w]
                  - prefix[tops + h, lefts] + prefix[tops, lefts])
        new = h * w - masked
        for t, l in zip(*np.nonzero(new == remaining)):
            exact.append((int(tops[t, l]), int(lefts[t, l]), h, w))
        if not exact:  # only needed while no exact completion exists
            for t, l in zip(*np.nonzero((new >= 1) & (new < remaining))):
                partial.append((int(tops[t, l]), int(lefts[t, l]), h, w))
    pool = exact or partial
    return pool[int(rng.integers(len(pool)))] if pool else None


def beit_block_mask_with_blocks(
    rng: np.random.Generator,
    grid: Tuple[int, int] = (14, 14),
    num_masking: int = 75,
    min_block: int = 16,
    max_block: Optional[int] = None,
    min_aspect: float = 0.3,
    max_aspect: Optional[float] = None,
    max_restarts: int = 100,
) -> Tuple[np.ndarray, List[Block]]:
    """BEiT blockwise masking with exactly ``num_masking`` masked patches; also the blocks placed.

    Proposal phase, as BEiT's code: area ~ U(min_block, min(remaining, max_block)), log aspect ~
    U(log min_aspect, log max_aspect), h = round(sqrt(area * aspect)), w = round(sqrt(area /
    aspect)), a uniform position; accepted when it adds 1..remaining new patches. Two deliberate
    differences: (1) a rounded (h, w) outside the area/aspect limits is rejected (BEiT's rounding
    can make e.g. a 2 x 7 = 14-patch block), so every block lies within the limits exactly;
    (2) after 10 rejected proposals in a row, where BEiT stops short, the end game draws uniformly
    among all admissible rectangles adding exactly ``remaining`` patches, or else 1..remaining.
    If even that finds none (very rare: the unmasked patches left no rectangle with few enough
    of them), the mask is redrawn from scratch with the same generator, so the result is still a
    pure function of the seed. Blocks are (top, left, h, w); sides stay below the grid, as BEiT.
    """
    height, width = grid
    max_block = num_masking if max_block is None else max_block
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if not 0 < num_masking <= height * width:
        raise ValueError(f"num_masking must be in 1..{height * width}, got {num_masking}")
    shapes = _admissible_shapes(grid, min_block, max_block, min_aspect, max_aspect)
    if not shapes:
        raise ValueError(f"no block of {min_block}..{max_block} patches with aspect "
                         f"{min_aspect:.3g}..{max_aspect:.3g} fits a {height}x{width} grid")
    admissible = set(shapes)
    log_aspect = (math.log(min_aspect), math.log(max_aspect))

    for _ in range(max_restarts):
        mask = np.zeros(grid, dtype=bool)
        blocks: List[Block] = []
        count = 0
        while count < num_masking:
            remaining = num_masking - count
            block = None
            for _attempt in range(10):
                # Like Python's random.uniform, the bounds may come reversed once remaining < min_block
                # (numpy's uniform refuses that): the area then lies between the two.
                cap = min(remaining, max_block)
                area = min_block + (cap - min_block) * rng.random()
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if (h, w) not in admissible:
                    continue
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= remaining:
                    block = (top, left, h, w)
                    break
            if block is None:
                block = _end_game(rng, mask, shapes, remaining)
                if block is None:
                    break  # stuck: redraw the whole mask
            top, left, h, w = block
            count += h * w - int(mask[top:top + h, left:left + w].sum())
            mask[top:top + h, left:left + w] = True
            blocks.append(block)
        if count == num_masking:
            return mask, blocks
    raise RuntimeError(f"could not mask exactly {num_masking} patches in {max_restarts} tries")


def beit_block_mask(
    rng: np.random.Generator,
    grid: Tuple[int, int] = (14, 14),
    num_masking: int = 75,
    min_block: int = 16,
    max_block: Optional[int] = None,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """bool [grid]: True = masked patch; exactly ``num_masking`` of them (BEiT Algorithm 1)."""
    return beit_block_mask_with_blocks(rng, grid, num_masking, min_block, max_block, min_aspect)[0]


def mask_batch(masks: List[np.ndarray]) -> torch.Tensor:
    """Per-image token masks [h, w] -> bool tensor [B, h * w] (row-major), as the models take it."""
    return torch.from_numpy(np.stack([m.reshape(-1) for m in masks]))


def masks_for(key: MicroKey, batch: int, device: torch.device, draw: Callable[[np.random.Generator], np.ndarray]
              ) -> torch.Tensor:
    """bool [B, L] on `device`: `draw(rng)` per image, from the micro-batch's own mask stream."""
    rng = np.random.default_rng(key.seed_for(MASK_STREAM))
    return mask_batch([draw(rng) for _ in range(batch)]).to(device)


def seed_drop_path(key: MicroKey) -> None:
    """Drop path draws from torch's global generator: seeded per micro-batch for an exact resume."""
    torch.manual_seed(key.seed_for(DROP_PATH_STREAM))


def masks_from_seeds(seeds: list[int], device: torch.device, draw: Callable[[np.random.Generator], np.ndarray]
                     ) -> torch.Tensor:
    """bool [B, L]: `draw(rng)` per image from the image's own seed (held-out masks that stay the
    same whatever batch or rank the image lands in)."""
    return mask_batch([draw(np.random.default_rng(seed)) for seed in seeds]).to(device)
