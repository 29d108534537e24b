"""Fine-tuning transforms: MAE's train augmentation (timm RandAugment) and its eval resize + crop.

MAE fine-tunes with timm's ``create_transform(is_training=True, auto_augment=
"rand-m9-mstd0.5-inc1", interpolation="bicubic")`` (He et al., https://arxiv.org/abs/2111.06377,
Table 11; ``main_finetune.py`` in the reference code). ``FinetuneAugment`` is that train transform
built from timm's own pieces (``RandomResizedCropAndInterpolation``, ``rand_augment_transform``),
stopped before ``ToTensor``/``Normalize``/``RandomErasing``: it returns uint8 [3, S, S] and the
trainer normalises, erases and mixes on the device, per batch.

Both transforms have the loader's augment signature ``(bytes, torch.Generator) -> uint8 [3, S, S]``
(``make_loader(augment=...)``, ``make_eval_loader(transform=...)``) and decode with
``augment.decode_rgb``, so bad bytes raise the same :class:`~data_pipeline.augment.BadImage`
kinds (``empty``, ``too_large``, ``undecodable``) as pretraining.

Determinism: timm and torchvision draw from the *global* Python, NumPy and torch RNGs. For exact
resume the output must be a pure function of (bytes, generator state), so each call derives one
seed from the generator, seeds the three global RNGs with it, runs the transforms and restores
the caller's RNG states. That makes a call not thread-safe (DataLoader workers are processes, so
the loader is fine), and it costs a few microseconds per image.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision import transforms as T

from .augment import DEFAULT_MAX_PIXELS, decode_rgb

__all__ = ["FinetuneAugment", "EvalTransform"]

_DEFAULT_AA = "rand-m9-mstd0.5-inc1"  # MAE fine-tuning recipe (RandAugment m9, std 0.5)


def _to_pil(data: bytes, max_pixels: int) -> Image.Image:
    # decode_rgb: libjpeg-turbo for JPEGs, PIL otherwise; grey/CMYK/alpha -> RGB; size guard
    return Image.fromarray(decode_rgb(data, max_pixels).contiguous().numpy())


def _to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, also for 0 bits: RandAugment's increasing posterize asks for 0 bits at
    magnitude 10 (m9 + mstd0.5 reaches it ~2% of the time). Pillow < 13 turned that into a black
    image (its LUT masks every bit); Pillow 13 raises ValueError, which the loader would count as
    a bad sample. Keep the old result, the one MAE's recipe was trained with."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # all zeros, as the old LUT gave
    return ImageOps.posterize(img, bits_to_keep)


class _SeededGlobals:
    """Seed Python's ``random``, NumPy's and torch's global RNGs on entry; restore them on exit."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed([self.seed & 0xFFFFFFFF, self.seed >> 32])  # legacy seed takes 32-bit words
        torch.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        py, npy, th = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class FinetuneAugment:
    """decode -> timm RandomResizedCrop -> horizontal flip -> timm RandAugment -> uint8 [3, S, S].

    The same steps and parameters as timm's ``transforms_imagenet_train`` (MAE's fine-tuning
    call) up to, not including, ``ToTensor``: RandAugment's ``translate_const`` is
    ``int(0.45 * input_size)`` and its fill colour ``img_mean`` is ``mean`` in 0..255, as there;
    colour jitter is off because RandAugment is on (timm does the same). ``auto_augment=None``:
    crop and flip only. ``aug(data, generator)``; ``generator`` may also be an int seed.
    Picklable (DataLoader workers get a copy).
    """

    def __init__(
        self,
        input_size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = _DEFAULT_AA,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.input_size = int(input_size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.auto_augment, self.interpolation = auto_augment, interpolation
        self.mean = tuple(float(m) for m in mean)
        self.max_pixels = max_pixels
        steps: list = [RandomResizedCropAndInterpolation(
            self.input_size, scale=self.scale, ratio=self.ratio, interpolation=interpolation)]
        if self.hflip > 0:
            steps.append(T.RandomHorizontalFlip(p=self.hflip))
        if auto_augment:
            if not auto_augment.startswith("rand"):
                raise ValueError(f"auto_augment must be a RandAugment spec ('rand-...') or None, "
                                 f"got {auto_augment!r}")
            hparams = dict(translate_const=int(self.input_size * 0.45),
                           img_mean=tuple(min(255, round(255 * m)) for m in self.mean))
            if interpolation != "random":
                hparams["interpolation"] = str_to_pil_interp(interpolation)
            ra = rand_augment_transform(auto_augment, hparams)
            for op in ra.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
            steps.append(ra)
        self.transform = T.Compose(steps)

    def __repr__(self) -> str:
        return (f"FinetuneAugment(input_size={self.input_size}, scale={self.scale}, "
                f"ratio={self.ratio}, hflip={self.hflip}, auto_augment={self.auto_augment!r}, "
                f"interpolation={self.interpolation!r})")

    def __call__(self, data: bytes, generator: torch.Generator | int) -> torch.Tensor:
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        img = _to_pil(data, self.max_pixels)  # before drawing: a bad image consumes no draws
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with _SeededGlobals(seed):
            out = self.transform(img)
        return _to_chw(out)


class EvalTransform:
    """decode -> resize the shorter side to ``int(input_size / crop_pct)`` -> centre crop
    ``input_size`` -> uint8 [3, S, S] (MAE's eval: 256 then 224, bicubic, on the PIL image as
    torchvision does). ``t(data, generator=None)``: the generator is accepted and ignored."""

    def __init__(self, input_size: int = 224, crop_pct: float = 0.875,
                 interpolation: str = "bicubic", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.input_size, self.crop_pct = int(input_size), float(crop_pct)
        self.interpolation, self.max_pixels = interpolation, max_pixels
        self.resize_size = int(self.input_size / self.crop_pct)
        self.transform = T.Compose([
            T.Resize(self.resize_size, interpolation=T.InterpolationMode(interpolation)),
            T.CenterCrop(self.input_size),
        ])

    def __repr__(self) -> str:
        return (f"EvalTransform(input_size={self.input_size}, crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation!r})")

    def __call__(self, data: bytes, generator: torch.Generator | int | None = None) -> torch.Tensor:
        return _to_chw(self.transform(_to_pil(data, self.max_pixels)))
