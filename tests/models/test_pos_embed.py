"""Sin-cos position embeddings and their resizing for other resolutions."""

import pytest
import torch
from torch.testing import assert_close

from mae_scale.models import get_2d_sincos_pos_embed, interpolate_pos_embed


def test_sincos_layout_of_first_patch_and_cls_row():
    table = get_2d_sincos_pos_embed(32, 3, cls_token=True)  # [1 + 9, 32]
    assert table.shape == (10, 32) and table.dtype == torch.float64
    assert torch.count_nonzero(table[0]) == 0
    # Patch (0, 0): each quarter is sin(0) = 0 then cos(0) = 1 for both axes.
    expected = torch.tensor(([0.0] * 8 + [1.0] * 8) * 2, dtype=torch.float64)
    assert_close(table[1], expected)


def test_first_half_encodes_the_column():
    table = get_2d_sincos_pos_embed(32, (2, 3))  # [6, 32], raster order over (row, column)
    half = 16
    # Same column, different row -> same first half; same row, different column -> same second half.
    assert_close(table[0, :half], table[3, :half])
    assert_close(table[0, half:], table[1, half:])
    assert not torch.allclose(table[0, :half], table[1, :half])


def test_sincos_needs_dim_divisible_by_four():
    with pytest.raises(ValueError):
        get_2d_sincos_pos_embed(30, 4)


def test_interpolate_identity_when_grid_unchanged():
    pos = get_2d_sincos_pos_embed(64, 14, cls_token=True).float()[None]
    assert interpolate_pos_embed(pos, 14) is pos
    assert interpolate_pos_embed(pos, (14, 14)) is pos


def test_interpolate_keeps_cls_and_resizes_patches():
    pos = torch.randn(1, 1 + 14 * 14, 64)
    out = interpolate_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 16 * 16, 64)
    assert_close(out[:, :1], pos[:, :1], rtol=0, atol=0)
    rect = interpolate_pos_embed(pos, (12, 20))
    assert rect.shape == (1, 1 + 240, 64)


def test_interpolate_is_bicubic_on_the_patch_grid():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    out = interpolate_pos_embed(pos, 6)
    grid = pos[0, 1:].reshape(4, 4, 8).permute(2, 0, 1)[None]  # [1, D, 4, 4]
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert_close(out[0, 1:], expected[0].permute(1, 2, 0).reshape(36, 8))
    # A constant field stays constant.
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 16, 8), 0.5)], dim=1)
    assert_close(interpolate_pos_embed(const, 7)[:, 1:], torch.full((1, 49, 8), 0.5))


def test_interpolate_keeps_dtype_and_checks_grid():
    pos = torch.randn(1, 1 + 16, 8, dtype=torch.bfloat16)
    assert interpolate_pos_embed(pos, 8).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), 4)
    assert interpolate_pos_embed(torch.randn(1, 1 + 15, 8), 5, old_grid=(3, 5)).shape == (1, 26, 8)
