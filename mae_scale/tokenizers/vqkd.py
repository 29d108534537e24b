"""The BEiT v2 VQ-KD tokenizer's *encoder side*, loaded from a local state dict.

BEiT v2 (https://arxiv.org/abs/2208.06366) predicts, for each masked patch, the id that a VQ-KD
tokenizer gives it. Architecture: written here from the structure of microsoft/unilm ``beit2``
(``modeling_vqkd.py`` ``VQKD.get_tokens`` / ``encode``, ``modeling_finetune.py``
``VisionTransformer`` with ``get_model_default_params()``, ``norm_ema_quantizer.py``
``NormEMAVectorQuantizer``), so that :meth:`VQKDEncoder.state_dict` has exactly the official
encoder-side keys and shapes (the test lists them for ``vqkd_encoder_base_decoder_3x768x12_clip``):

* ``encoder.*``: a BEiT-style ViT-B/16 (embed 768, depth 12, 12 heads, MLP 4x, LayerNorm eps 1e-6):
  ``patch_embed.proj`` (conv p x p, stride p), ``cls_token`` [1, 1, D], absolute ``pos_embed``
  [1, 1 + n*n, D]; pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` without
  layer-scale (init_values 0) or relative position bias; attention ``qkv`` has a weight only,
  its bias is ``cat(q_bias, 0, v_bias)`` (k has none), scale head_dim ** -0.5, softmax, ``proj``;
  MLP fc1, exact (erf) GELU, fc2. Mean-pooling variant: ``norm`` is the identity and
  ``fc_norm`` (LayerNorm) is applied to the patch tokens (the cls token is dropped); no head.
* ``encode_task_layer``: Linear(D, D), Tanh, Linear(D, code_dim) (``.0`` / ``.2``), in fp32.
* ``quantize.embedding.weight`` [n_code, code_dim]: the features are l2-normalized over code_dim
  and a patch's token is ``argmin ||z||^2 + ||e||^2 - 2 z.e`` over the codebook *as stored* (the
  official forward does not re-normalize it; EMA training keeps it on the unit sphere).

Hyper-parameters are read off the shapes (:meth:`VQKDEncoder.config_from_state_dict`): width,
input channels and patch size from ``encoder.patch_embed.proj.weight``, depth from the block
indices, MLP width from ``fc1``, the position grid n from ``pos_embed`` (n*n + 1 rows, square),
codebook size and dim from ``quantize.embedding.weight``. The number of heads is not stored in a
state dict: every official VQ-KD encoder is ViT-B with 12 heads of 64 dims, so it is taken as
width / 64 (a width that is not a multiple of 64 is refused).

What is loaded and what is ignored (:func:`check_state_dict`): every ``encoder.*``,
``encode_task_layer.*`` and ``quantize.*`` key is checked strictly (missing, unexpected or wrongly
shaped: a one-line ValueError naming the first one). The quantizer's training statistics
``quantize.embedding.cluster_size`` / ``embed_avg`` / ``initted`` and ``quantize.cluster_size``
are optional; when present their shapes are checked and they are otherwise unused (a file whose
``initted`` is 0 holds a codebook that was never initialized and is refused). ``decoder.*``,
``decode_task_layer.*``, ``teacher*``, ``scaling_layer*`` and ``loss*`` keys (the decoder and the
CLIP teacher, needed only to train the tokenizer) are ignored; any other key is refused.

Input (:class:`VQKDTokenizer`): BEiT v2 pretraining (``run_beitv2_pretraining.py``) builds the
tokenizer with the default ``process_type='default'``: the tokenizer's view of the crop is
``ToTensor()`` pixels in [0, 1], which ``pre_process`` multiplies by 255 and maps with
``x / 127.5 - 1`` to [-1, 1] ('imagenet_norm' exists in the code but is not what pretraining
uses). We only have the model's ImageNet-normalized crop, so :meth:`VQKDTokenizer.encode`
un-normalizes it back to [0, 1] (clamped) and then applies the same mapping.

Differences from the official pipeline:

* The official pretraining gives the tokenizer its own resize of the same crop (Lanczos, at
  ``second_input_size`` 224, the model's size); we tokenize the model's own crop.
* Everything runs in fp32. Officially the ViT and the quantizer run under CUDA fp16 autocast
  (only ``encode_task_layer`` is forced to fp32), so on a GPU near-tie argmins can differ.
* Position grid: a crop whose patch grid is not the stored n x n gets the official interpolation
  (``VisionTransformer.interpolate_pos_encoding``: the patch part of ``pos_embed`` resized
  bicubically with scale factors ``(grid + 0.1) / n``; the cls row kept). The official code skips
  the interpolation when the token *count* matches (a non-square grid with n*n patches would get
  the square embedding row by row); we interpolate for any grid other than n x n.

Getting a file: the official ``vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth`` is a
``torch.save`` of ``{"model": state_dict}``, which ``torch.load(weights_only=True)`` reads (no code
runs), so point ``model.tokenizer`` at it directly. A ``{"state_dict": ...}`` wrapper, a bare
state dict, or a safetensors file of the state dict work too. A checkpoint that also pickles
Python objects (e.g. an ``args`` namespace) is refused; re-save only its ``"model"`` entry, in
your own trusted environment.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mae_scale.tokenizers.dalle import check_own_keys, shape_of, unit_pixels

LN_EPS = 1.0e-6  # get_model_default_params: norm_layer=partial(nn.LayerNorm, eps=1e-6)
HEAD_DIM = 64  # official VQ-KD encoders: ViT-B, 768 / 12 heads
IGNORED_PREFIXES = ("decoder.", "decode_task_layer.", "teacher", "scaling_layer", "loss")
SIGNATURE = ("encoder.patch_embed.proj.weight", "quantize.embedding.weight")  # what marks a VQ-KD file


def is_vqkd_state_dict(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in SIGNATURE)


class _Attention(nn.Module):
    """BEiT attention: qkv weight without bias, separate q_bias / v_bias (k has no bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)


class _ViT(nn.Module):
    """The tokenizer's encoder: patch tokens after ``fc_norm`` (mean-pooling variant, no head)."""

    def __init__(self, dim: int, depth: int, num_heads: int, hidden: int, patch_size: int,
                 in_chans: int, grid: int) -> None:
        super().__init__()
        self.patch_size, self.grid = patch_size, grid
        self.patch_embed = _PatchEmbed(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, num_heads, hidden) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """[1, 1 + gh*gw, D]: stored as is for the stored grid, else the official bicubic resize."""
        n = self.grid
        if (gh, gw) == (n, n):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, n, n, d).permute(0, 3, 1, 2)
        # The official +0.1 (from DINO) makes floor(n * scale) land on the target size; torch then
        # samples with the given scale factor, so it is part of the result, not only of the size.
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic")
        if tuple(grid.shape[-2:]) != (gh, gw):
            raise ValueError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
        return torch.cat((cls_pos, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> patch features [B, (H/p)*(W/p), D] (row-major grid)."""
        x = self.patch_embed.proj(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.position_embedding(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])


class _Codebook(nn.Module):
    def __init__(self, n_code: int, code_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_code, code_dim))


class _Quantizer(nn.Module):
    """Inference half of NormEMAVectorQuantizer: nearest stored codeword to the l2-normalized feature."""

    def __init__(self, n_code: int, code_dim: int) -> None:
        super().__init__()
        self.embedding = _Codebook(n_code, code_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., code_dim] -> ids Long [...]."""
        z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        e = self.embedding.weight
        d = flat.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2.0 * flat @ e.T
        return d.argmin(dim=1).reshape(z.shape[:-1])


class VQKDEncoder(nn.Module):
    """VQ-KD encoder side: [B, C, H, W] pixels in [-1, 1] -> token ids Long [B, H/p, W/p]."""

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_hidden: int = 3072,
                 patch_size: int = 16, in_chans: int = 3, grid: int = 14, n_code: int = 8192,
                 code_dim: int = 32) -> None:
        super().__init__()
        if (min(embed_dim, depth, num_heads, mlp_hidden, patch_size, in_chans, grid, code_dim) < 1
                or n_code < 2 or embed_dim % num_heads):
            raise ValueError(f"bad VQ-KD encoder config: embed_dim={embed_dim}, depth={depth}, num_heads="
                             f"{num_heads}, mlp_hidden={mlp_hidden}, patch_size={patch_size}, in_chans={in_chans}, "
                             f"grid={grid}, n_code={n_code}, code_dim={code_dim}")
        self.patch_size, self.in_chans, self.grid = patch_size, in_chans, grid
        self.n_code, self.code_dim = n_code, code_dim
        # Registered in the official module's order (encoder, [decoder], quantize, encode_task_layer).
        self.encoder = _ViT(embed_dim, depth, num_heads, mlp_hidden, patch_size, in_chans, grid)
        self.quantize = _Quantizer(n_code, code_dim)
        self.encode_task_layer = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(),
                                               nn.Linear(embed_dim, code_dim))
        self.requires_grad_(False)

    @classmethod
    def config_from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Dict[str, int]:
        """The hyper-parameters a state dict was made with (read off shapes; heads = width / 64)."""
        def get(key: str, ndim: int) -> torch.Tensor:
            t = sd.get(key)
            if not isinstance(t, torch.Tensor) or t.ndim != ndim:
                raise ValueError(f"{key} missing or not {ndim}-d")
            return t

        proj = get("encoder.patch_embed.proj.weight", 4)
        dim, in_chans, ph, pw = proj.shape
        if ph != pw:
            raise ValueError(f"encoder.patch_embed.proj.weight {tuple(proj.shape)}: patches must be square")
        if dim % HEAD_DIM:
            raise ValueError(f"width {dim} is not a multiple of {HEAD_DIM} (heads are taken as width / "
                             f"{HEAD_DIM}, as in the official ViT-B tokenizer)")
        tokens = get("encoder.pos_embed", 3).shape[1] - 1
        grid = math.isqrt(max(tokens, 0))
        if grid * grid != tokens or grid < 1:
            raise ValueError(f"encoder.pos_embed has {tokens} patch rows, not a square grid")
        blocks = {int(m.group(1)) for k in sd for m in [re.match(r"encoder\.blocks\.(\d+)\.", k)] if m}
        codebook = get("quantize.embedding.weight", 2)
        return {"embed_dim": int(dim), "depth": max(blocks) + 1 if blocks else 0, "num_heads": int(dim) // HEAD_DIM,
                "mlp_hidden": int(get("encoder.blocks.0.mlp.fc1.weight", 2).shape[0]), "patch_size": int(ph),
                "in_chans": int(in_chans), "grid": grid, "n_code": int(codebook.shape[0]),
                "code_dim": int(codebook.shape[1])}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] [B, C, H, W] -> quantizer inputs (before l2norm) fp32 [B, h*w, code_dim]."""
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"expected [B, {self.in_chans}, H, W] with H, W multiples of {self.patch_size}, "
                             f"got {tuple(x.shape)}")
        return self.encode_task_layer(self.encoder(x.float()).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ids = self.quantize(self.features(x))
        return ids.reshape(b, h // self.patch_size, w // self.patch_size)


def _optional_shapes(model: VQKDEncoder) -> Dict[str, Tuple[int, ...]]:
    """The quantizer's EMA training statistics: accepted if present (shape-checked), never used."""
    k, d = model.n_code, model.code_dim
    return {"quantize.embedding.cluster_size": (k,), "quantize.embedding.embed_avg": (k, d),
            "quantize.embedding.initted": (1,), "quantize.cluster_size": (k,)}


def check_state_dict(model: VQKDEncoder, sd: Mapping[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
    """One-line ValueError naming the first encoder-side key that is missing, unexpected or of the
    wrong shape; returns the entries :meth:`VQKDEncoder.load_state_dict` takes (strict)."""
    to_load = check_own_keys(model, sd, where, "VQ-KD encoder")
    optional = _optional_shapes(model)
    for k, shape in optional.items():
        if k in sd and (not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != shape):
            raise ValueError(f"{where}: VQ-KD key {k} has shape {shape_of(sd[k])}, expected {shape}")
    initted = sd.get("quantize.embedding.initted")
    if isinstance(initted, torch.Tensor) and not bool(initted.reshape(-1)[0]):
        raise ValueError(f"{where}: quantize.embedding.initted is 0: the codebook was never initialized")
    extra = [k for k in sd if k not in to_load and k not in optional and not k.startswith(IGNORED_PREFIXES)]
    if extra:
        raise ValueError(f"{where}: unexpected key {extra[0]} for a VQ-KD encoder ({len(extra)} unexpected keys; "
                         "only the mean-pooling ViT without layer-scale or relative position bias exists)")
    return to_load


class VQKDTokenizer:
    """BEiT v2 targets from a VQ-KD encoder, behind our Tokenizer protocol.

    :meth:`encode` un-normalizes the ImageNet-normalized crop to [0, 1] (clamped), maps it to
    [-1, 1] as the official ``pre_process('default')`` does, and runs the encoder in fp32 in eval
    mode without gradients on the images' device -> Long [B, H/p, W/p] (see the module docstring).
    """

    def __init__(self, encoder: VQKDEncoder) -> None:
        self.encoder = encoder.float().eval().requires_grad_(False)
        self.patch_size = encoder.patch_size
        self.vocab_size = encoder.n_code

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized float [B, 3, H, W] (any device) -> Long [B, H/p, W/p] on that device."""
        x = unit_pixels(images, self.patch_size, self.encoder)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.encoder(x * 255.0 / 127.5 - 1.0)
