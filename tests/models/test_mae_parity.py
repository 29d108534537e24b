"""Numerical parity of MaskedAutoencoderViT against the plain reference in reference_mae.py.

Both load the same (randomised) state dict with strict=True, which also proves the key layout of the
published MAE checkpoints; then loss, pred and mask must agree in fp32.
"""

import pytest
import torch
from torch.testing import assert_close

from mae_scale.models import get_2d_sincos_pos_embed, mae_vit_base_patch16, mae_vit_tiny_patch16
from reference_mae import ReferenceMAE, sincos_2d


def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Replace MAE's init (zero biases, unit LayerNorms) by random values so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # keep the fixed sin-cos tables
                centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm gains near 1
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + centre)


def _pair(factory, ref_kwargs, norm_pix_loss, seed):
    torch.manual_seed(seed)
    model = factory(norm_pix_loss=norm_pix_loss).eval()
    _randomise_(model, seed)
    ref = ReferenceMAE(norm_pix_loss=norm_pix_loss, **ref_kwargs).eval()
    # The reference's own numpy sin-cos tables must equal ours before any weights are copied.
    assert_close(ref.pos_embed, model.pos_embed, rtol=0, atol=1e-6)
    assert_close(ref.decoder_pos_embed, model.decoder_pos_embed, rtol=0, atol=1e-6)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


TINY = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=4, num_heads=3,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
BASE_SHALLOW = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=2, num_heads=12,
                    decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16)


def _base_shallow(**kw):
    return mae_vit_base_patch16(depth=2, decoder_depth=1, **kw)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize(
    "factory,ref_kwargs", [(mae_vit_tiny_patch16, TINY), (_base_shallow, BASE_SHALLOW)], ids=["tiny", "base-2blk"]
)
def test_forward_matches_reference(factory, ref_kwargs, norm_pix_loss):
    model, ref = _pair(factory, ref_kwargs, norm_pix_loss, seed=0)
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 224, 224, generator=gen)
    noise = torch.rand(2, 196, generator=gen)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
        ref_loss, ref_pred, ref_mask = ref(imgs, 0.75, noise)
    assert_close(mask, ref_mask, rtol=0, atol=0)
    assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_patchify_matches_reference_and_roundtrips():
    model = mae_vit_tiny_patch16(img_size=64)
    ref = ReferenceMAE(norm_pix_loss=False, **{**TINY, "img_size": 64})
    imgs = torch.randn(3, 3, 64, 64)
    patches = model.patchify(imgs)  # [3, 16, 768]
    assert patches.shape == (3, 16, 16 * 16 * 3)
    assert_close(patches, ref.patchify(imgs), rtol=0, atol=0)
    assert_close(model.unpatchify(patches), imgs, rtol=0, atol=0)


def test_sincos_matches_numpy_on_non_square_grid():
    ours = get_2d_sincos_pos_embed(64, (3, 5), cls_token=True)
    ref = torch.from_numpy(sincos_2d(64, 3, 5, cls_token=True))
    assert ours.shape == (1 + 15, 64)
    assert_close(ours, ref, rtol=0, atol=1e-12)
