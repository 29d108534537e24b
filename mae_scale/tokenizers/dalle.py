"""The DALL-E dVAE *encoder* (BEiT v1's tokenizer), loaded from a local state dict.

Architecture: written here from the structure of OpenAI's ``dall_e`` package
(https://github.com/openai/DALL-E, ``dall_e/encoder.py`` and ``dall_e/utils.py``), so that
:meth:`DallEEncoder.state_dict` has exactly the official encoder's keys and shapes
(``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ..., ``blocks.output.conv.b``):

* every convolution holds its weight as ``w`` [out, in, k, k] and bias as ``b`` [out], stride 1,
  padding (k - 1) / 2;
* ``blocks.input``: 7x7 conv, input_channels -> n_hid;
* four groups of ``n_blk_per_group`` residual blocks at n_hid, 2 n_hid, 4 n_hid, 8 n_hid channels,
  a 2x2 max-pool after groups 1-3 (so the token grid is the input size / 8);
* a block maps n_in -> n_out as ``id_path(x) + res_path(x) / (4 * n_blk_per_group) ** 2``, where
  ``id_path`` is a 1x1 conv when n_in != n_out (the first block of groups 2-4) and the identity
  otherwise, and ``res_path`` is relu, 3x3 conv (n_in -> n_out/4), relu, 3x3 conv, relu, 3x3 conv,
  relu, 1x1 conv (n_out/4 -> n_out);
* ``blocks.output``: relu, 1x1 conv 8 n_hid -> vocab_size (the logits).

Defaults are the official ones (group_count 4, n_hid 256, n_blk_per_group 2, input_channels 3,
vocab_size 8192): 74 tensors, 53,786,240 values (the test lists every key and shape).

Difference from the official forward pass: everything runs in fp32. The official ``Conv2d`` casts
to fp16 on CUDA for every conv but the output one (``use_float16``), so on a GPU its argmax can
differ from ours on near-ties.

Getting a state dict: the official ``encoder.pkl`` is a pickled module, and unpickling runs code,
so this project never loads it. Convert it once, in your own trusted environment with the
``dall_e`` package installed::

    import torch, safetensors.torch
    enc = torch.load("encoder.pkl", map_location="cpu", weights_only=False)  # trusted file only
    safetensors.torch.save_file(enc.state_dict(), "dalle_encoder.safetensors")

and point ``model.tokenizer`` at ``dalle_encoder.safetensors`` (a ``.pth`` holding only the state
dict, readable by ``torch.load(weights_only=True)``, works too).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1  # dall_e.utils.logit_laplace_eps
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def unit_pixels(images: torch.Tensor, patch_size: int, encoder: nn.Module) -> torch.Tensor:
    """A tokenizer's view of the model's crop: ImageNet-normalized [B, 3, H, W] (H, W multiples of
    `patch_size`) back to fp32 pixels in [0, 1] (clamped); moves `encoder` to the images' device."""
    b, c, h, w = images.shape
    if c != 3 or h % patch_size or w % patch_size:
        raise ValueError(f"expected [B, 3, H, W] with H, W multiples of {patch_size}, got {tuple(images.shape)}")
    dev = images.device
    if next(encoder.parameters()).device != dev:
        encoder.to(dev)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0.0, 1.0)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> [eps, 1 - eps], the dVAE's input range (logit-Laplace, eps 0.1)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class _Conv(nn.Module):
    """A same-padded conv whose parameters are named ``w`` and ``b`` as in the official file."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _Block(nn.Module):
    """Bottleneck residual block: identity (or 1x1 conv) + post_gain * (relu-conv x4)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _Conv(n_in, hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", _Conv(hid, hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _Conv(hid, hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _Conv(hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DallEEncoder(nn.Module):
    """The DALL-E dVAE encoder: [B, C, H, W] mapped pixels -> logits [B, vocab, H/8, W/8]."""

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2,
                 input_channels: int = 3, vocab_size: int = 8192) -> None:
        super().__init__()
        if group_count != 4:  # the official file hard-codes four groups too
            raise ValueError(f"only group_count=4 exists in the DALL-E encoder, got {group_count}")
        if n_hid < 4 or n_hid % 4 or n_blk_per_group < 1 or input_channels < 1 or vocab_size < 2:
            raise ValueError(f"bad DALL-E encoder config: n_hid={n_hid} (a multiple of 4), n_blk_per_group="
                             f"{n_blk_per_group}, input_channels={input_channels}, vocab_size={vocab_size}")
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]  # in front of / inside groups 1..4
        layers: "OrderedDict[str, nn.Module]" = OrderedDict(input=_Conv(input_channels, n_hid, 7))
        for g in range(1, group_count + 1):
            group: "OrderedDict[str, nn.Module]" = OrderedDict()
            for i in range(n_blk_per_group):
                n_in = widths[g - 1] if i == 0 else widths[g]
                group[f"block_{i + 1}"] = _Block(n_in, widths[g], n_layers)
            if g < group_count:
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            layers[f"group_{g}"] = nn.Sequential(group)
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_Conv(8 * n_hid, vocab_size, 1)))
        self.blocks = nn.Sequential(layers)
        self.requires_grad_(False)

    @classmethod
    def config_from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Dict[str, int]:
        """The hyper-parameters a state dict was made with (read off a few shapes)."""
        w_in, w_out = sd["blocks.input.w"], sd.get("blocks.output.conv.w")
        if w_in.ndim != 4 or w_out is None or w_out.ndim != 4:
            raise ValueError("blocks.input.w / blocks.output.conv.w missing or not 4-d")
        prefix = "blocks.group_1.block_"
        blocks = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
        return {"n_hid": int(w_in.shape[0]), "input_channels": int(w_in.shape[1]),
                "vocab_size": int(w_out.shape[0]), "n_blk_per_group": max(len(blocks), 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected [B, {self.input_channels}, H, W], got {tuple(x.shape)}")
        return self.blocks(x.float())


def shape_of(v) -> object:
    """A value's shape for a message (its type's name when it is no tensor)."""
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def check_own_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str, what: str) -> Dict[str, torch.Tensor]:
    """Every key of `model`'s state dict is in `sd`, of its shape, finite floating point; else a
    one-line ValueError naming the first that is not. Returns those entries (a strict load)."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise ValueError(f"{where}: {what} key {k} is missing")
        if not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: {what} key {k} has shape {shape_of(sd[k])}, expected {tuple(v.shape)}")
        if not sd[k].is_floating_point() or not torch.isfinite(sd[k]).all():
            raise ValueError(f"{where}: {what} key {k} is not finite floating point")
    return {k: sd[k] for k in own}


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
    """One-line ValueError naming the first key that is missing, unexpected or of the wrong shape;
    returns the entries :meth:`DallEEncoder.load_state_dict` takes (strict)."""
    to_load = check_own_keys(model, sd, where, "DALL-E encoder")
    extra = [k for k in sd if k not in to_load]
    if extra:
        raise ValueError(f"{where}: unexpected key {extra[0]} for a DALL-E encoder ({len(extra)} extra keys)")
    return to_load


class DallETokenizer:
    """BEiT v1 targets from a DALL-E dVAE encoder, behind our Tokenizer protocol.

    ``patch_size`` is 16 as our models see it: BEiT crops once and gives the ViT a 224-px view and
    the dVAE a 112-px view of the same crop (14 x 14 tokens either way). We only have the model's
    ImageNet-normalized crop, so :meth:`encode` un-normalizes it back to [0, 1] (clamped), resizes
    it to H/16*8 x W/16*8 (half size) with bilinear interpolation and antialiasing (BEiT resizes
    the original image with Lanczos; torch has no Lanczos, and antialiased bilinear at exactly 2x
    is a triangle filter over 4x4 pixels), applies ``map_pixels`` (eps 0.1), runs the encoder in
    fp32 in eval mode without gradients on the images' device, and takes the argmax over the
    vocabulary -> Long [B, H/16, W/16].
    """

    patch_size = 16
    _dvae_stride = 8  # three 2x2 max-pools

    def __init__(self, encoder: DallEEncoder) -> None:
        self.encoder = encoder.float().eval().requires_grad_(False)
        self.vocab_size = encoder.vocab_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized float [B, 3, H, W] (any device) -> Long [B, H/16, W/16] on that device."""
        x = unit_pixels(images, self.patch_size, self.encoder)
        h, w = images.shape[-2:]
        p = self.patch_size
        size = (h // p * self._dvae_stride, w // p * self._dvae_stride)
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        logits = self.encoder(map_pixels(x))
        return logits.argmax(dim=1)
