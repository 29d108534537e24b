"""Masked Autoencoder (MAE) with a Vision Transformer backbone.

He et al., "Masked Autoencoders Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377.

The encoder sees only the visible patches (25% by default); a light decoder gets the encoded visible
tokens plus a shared learned mask token at every removed position and regresses the pixels of each
patch. The loss is the mean squared error over the *removed* patches only, optionally against
per-patch normalized pixels (``norm_pix_loss``, the paper's default for its best results).

The module and parameter names match the published MAE pretrain checkpoints exactly, so those load
with ``load_state_dict(strict=True)`` and no key remapping. Blocks are timm's public ``Block``, whose
attention runs through PyTorch's fused ``scaled_dot_product_attention``.

Mixed precision: the engine may cast the parameters to bf16. ``forward`` then takes fp32 images,
casts them to the parameter dtype for the network, and computes the target and the loss in fp32.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .patches import patchify, run_blocks, unpatchify
from .pos_embed import get_2d_sincos_pos_embed
from .vit import VIT_ARCHS


class MaskedAutoencoderViT(nn.Module):
    """MAE: ViT encoder over visible patches + light ViT decoder predicting masked-patch pixels."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = grad_checkpointing

        # --- encoder ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos table; a frozen Parameter (not a buffer) because that is how the published
        # checkpoints store it, and so it follows the model through dtype/device moves and ZeRO.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # --- decoder ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """MAE's initialization. Safe to call again, e.g. after ``to_empty`` on a meta-built model."""
        grid = self.patch_embed.grid_size
        for param in (self.pos_embed, self.decoder_pos_embed):
            table = get_2d_sincos_pos_embed(param.shape[-1], grid, cls_token=True)  # [1+L, D] fp64 cpu
            with torch.no_grad():
                param.copy_(table.to(param.dtype).unsqueeze(0))

        # MAE keeps the conv bias at PyTorch's default init; resetting the conv first makes this method
        # complete on its own (after ``to_empty`` the bias would otherwise be uninitialised memory).
        self.patch_embed.proj.reset_parameters()
        # Patch embedding initialised like a Linear on the flattened [D, C*p*p] kernel, as MAE does.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Note: xavier over the fused qkv weight as one [3D, D] matrix, as MAE does (timm's own ViT
        # init splits it in three); kept so our runs start like the paper's.
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> patches [N, L, p*p*C], each patch flattened in (p, q, c) order."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """patches [N, L, p*p*C] -> imgs [N, C, H, W], on this model's patch grid."""
        return unpatchify(x, self.patch_size, tuple(self.patch_embed.grid_size), self.in_chans)

    # ------------------------------------------------------------------ masking
    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting uniform noise.

        x [N, L, D] -> (x_visible [N, len_keep, D], mask [N, L] fp32 with 0 keep / 1 removed,
        ids_restore [N, L]). The patches with the smallest noise are kept. Pass ``noise`` [N, L] to
        make the choice reproducible (tests, visualisation).
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)  # [N, L] in [0, 1)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise = keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # inverse permutation
        ids_keep = ids_shuffle[:, :len_keep]  # [N, len_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, len_keep, D]

        mask = torch.ones(n, length, device=x.device, dtype=torch.float32)  # in shuffled order
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order [N, L]
        return x_visible, mask, ids_restore

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(blocks, x, self.grad_checkpointing and self.training and torch.is_grad_enabled())

    # ------------------------------------------------------------------ forward
    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, C, H, W] -> (latent [N, 1+len_keep, D], mask [N, L], ids_restore [N, L])."""
        x = self.patch_embed(x)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]  # position added before masking, so kept tokens know where they are
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, len_keep, D]

        cls_token = self.cls_token + self.pos_embed[:, :1, :]  # [1, 1, D]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1+len_keep, D]
        x = self._run_blocks(self.blocks, x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+len_keep, D] -> pred [N, L, p*p*C] (pixels of every patch, cls dropped)."""
        x = self.decoder_embed(x)  # [N, 1+len_keep, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # [N, L-len_keep, Dd]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1+L, Dd]
        x = x + self.decoder_pos_embed

        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1+L, p*p*C]
        return x[:, 1:, :]  # [N, L, p*p*C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L] -> scalar fp32 loss on removed patches."""
        target = self.patchify(imgs.float())  # [N, L, p*p*C], fp32 whatever the parameter dtype
        if self.norm_pix_loss:
            # torch's default (unbiased) variance, exactly as the MAE code computes it.
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.float() - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()  # mean over removed patches only

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, C, H, W] (normalized, any float dtype) -> (loss fp32 [], pred [N, L, p*p*C], mask [N, L])."""
        x = imgs.to(self.patch_embed.proj.weight.dtype)  # fp32 input into bf16 parameters
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# ---------------------------------------------------------------------- presets
def _mae_preset(arch: str, decoder: Dict[str, Any], **kwargs: Any) -> MaskedAutoencoderViT:
    cfg: Dict[str, Any] = {**VIT_ARCHS[arch].kwargs(), **decoder}
    cfg.update(kwargs)  # caller's overrides win (img_size, norm_pix_loss, grad_checkpointing, ...)
    return MaskedAutoencoderViT(**cfg)


# The paper's decoder (512-d, 8 blocks, 16 heads) for every published size.
_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def mae_vit_tiny_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """Test-only size: 192-d, 4 blocks, 3 heads; decoder 128-d, 2 blocks, 4 heads."""
    decoder = dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
    return _mae_preset("vit_tiny_patch16", decoder, **kwargs)


def mae_vit_tiny_patch4(**kwargs: Any) -> MaskedAutoencoderViT:
    """Small-image size (Fashion-MNIST recipe): 4-px patches, 128-d, 6 blocks; decoder 96-d, 2 blocks."""
    decoder = dict(decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3)
    return _mae_preset("vit_tiny_patch4", decoder, **kwargs)


def mae_vit_base_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (768-d, 12 blocks, 12 heads) + the paper's decoder."""
    return _mae_preset("vit_base_patch16", _PAPER_DECODER, **kwargs)


def mae_vit_large_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (1024-d, 24 blocks, 16 heads) + the paper's decoder."""
    return _mae_preset("vit_large_patch16", _PAPER_DECODER, **kwargs)


def mae_vit_huge_patch14(**kwargs: Any) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (1280-d, 32 blocks, 16 heads) + the paper's decoder."""
    return _mae_preset("vit_huge_patch14", _PAPER_DECODER, **kwargs)


_PRESETS: Dict[str, Callable[..., MaskedAutoencoderViT]] = {
    "mae_vit_tiny_patch16": mae_vit_tiny_patch16,
    "mae_vit_tiny_patch4": mae_vit_tiny_patch4,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
}
MODEL_NAMES: Tuple[str, ...] = tuple(_PRESETS)


def build_mae(name: str, **kwargs: Any) -> MaskedAutoencoderViT:
    """Build an MAE preset by name; ``kwargs`` override the preset's constructor arguments."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown MAE model {name!r}; expected one of: {', '.join(MODEL_NAMES)}") from None
    return factory(**kwargs)
