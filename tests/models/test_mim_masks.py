"""SimMIM cell masks and BEiT blockwise masks (mae_scale.objectives.masking): counts, geometry, determinism."""

import numpy as np
import pytest

from mae_scale.objectives.masking import beit_block_mask, beit_block_mask_with_blocks, mask_batch, simmim_mask


# ---------------------------------------------------------------- SimMIM
@pytest.mark.parametrize("input_size, expected_cells", [(224, 30), (192, 22)])
def test_simmim_mask_counts_and_cell_alignment(input_size, expected_cells):
    # ceil(49 * 0.6) = 30 cells at 224 px; ceil(36 * 0.6) = 22 at 192 px; each 32-px cell = 2x2 tokens.
    grid = input_size // 16
    for seed in range(20):
        m = simmim_mask(np.random.default_rng(seed), input_size=input_size)
        assert m.shape == (grid, grid) and m.dtype == bool
        cells = m.reshape(grid // 2, 2, grid // 2, 2)
        assert (cells == cells[:, :1, :, :1]).all(), "a 2x2 token cell is not all-equal"
        assert cells[:, 0, :, 0].sum() == expected_cells
        assert m.sum() == expected_cells * 4


def test_simmim_mask_other_ratio_and_cell_size():
    m = simmim_mask(np.random.default_rng(0), input_size=224, mask_patch_size=56, model_patch_size=16 // 2,
                    mask_ratio=0.4)
    # 4x4 cells of 56 px, ceil(16 * 0.4) = 7 masked, each 7x7 tokens of 8 px.
    assert m.shape == (28, 28) and m.sum() == 7 * 49
    # 160 px: 5x5 cells, 25 * 0.6 = 15 exactly (ceil must not add one).
    assert simmim_mask(np.random.default_rng(0), input_size=160, mask_patch_size=32).sum() == 15 * 4


def test_simmim_mask_seeds():
    a = simmim_mask(np.random.default_rng(1))
    assert (a == simmim_mask(np.random.default_rng(1))).all()
    assert not (a == simmim_mask(np.random.default_rng(2))).all()


@pytest.mark.parametrize("kw", [dict(input_size=200), dict(mask_patch_size=24), dict(mask_ratio=1.0)])
def test_simmim_mask_refuses_sizes_that_do_not_divide(kw):
    with pytest.raises(ValueError):
        simmim_mask(np.random.default_rng(0), **kw)


# ---------------------------------------------------------------- BEiT
def test_beit_mask_exact_count_and_blocks_within_limits():
    # Tolerance: none beyond float rounding (1e-9). BEiT's code rounds h and w of the drawn block
    # and can land outside the limits (e.g. 2 x 7 = 14 < 16 patches); ours rejects such rounded
    # rectangles, so each block's integer area and h / w are checked against the limits exactly.
    eps = 1e-9
    n_blocks = []
    for seed in range(300):
        mask, blocks = beit_block_mask_with_blocks(np.random.default_rng(seed))
        assert mask.shape == (14, 14) and mask.dtype == bool
        assert mask.sum() == 75, f"seed {seed}: {mask.sum()} masked"
        union = np.zeros_like(mask)
        for top, left, h, w in blocks:
            assert 16 <= h * w <= 75
            assert 0.3 - eps <= h / w <= 1 / 0.3 + eps
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            union[top:top + h, left:left + w] = True
        assert (union == mask).all()
        n_blocks.append(len(blocks))
    assert min(n_blocks) >= 1 and max(n_blocks) > 1  # blockwise, not one rectangle every time


def test_beit_mask_other_grid_and_count():
    for seed in range(50):
        mask, blocks = beit_block_mask_with_blocks(np.random.default_rng(seed), grid=(12, 12), num_masking=50,
                                                   min_block=9, max_block=30)
        assert mask.sum() == 50
        assert all(9 <= h * w <= 30 for _, _, h, w in blocks)


def test_beit_mask_seeds_and_batch():
    a = beit_block_mask(np.random.default_rng(3))
    assert (a == beit_block_mask(np.random.default_rng(3))).all()
    assert not (a == beit_block_mask(np.random.default_rng(4))).all()
    rng = np.random.default_rng(0)
    t = mask_batch([beit_block_mask(rng) for _ in range(3)])
    assert tuple(t.shape) == (3, 196) and t.sum().item() == 3 * 75
    assert (t[0].reshape(14, 14).numpy() == beit_block_mask(np.random.default_rng(0))).all()


def test_beit_mask_refuses_impossible_limits():
    with pytest.raises(ValueError):
        beit_block_mask(np.random.default_rng(0), grid=(4, 4), num_masking=10, min_block=20)
    with pytest.raises(ValueError):
        beit_block_mask(np.random.default_rng(0), num_masking=0)
