"""Decode + MAE augmentation (RandomResizedCrop + horizontal flip), uint8 out.

This is the per-image CPU work of MAE pretraining (He et al., "Masked Autoencoders Are Scalable
Vision Learners", https://arxiv.org/abs/2111.06377, Sec. A.1: RandomResizedCrop scale 0.2-1 and
flip only). It is written for speed (measured side by side with the official pipeline by
`mae-scale bench data`; figures in docs/BENCHMARKS.md):

- JPEGs are decoded with libjpeg-turbo via ``torchvision.io.decode_jpeg`` (~1.3x-2x PIL); other
  formats and anything decode_jpeg rejects go through PIL.
- Only the cropped region is resized, on the HWC uint8 memory decode_jpeg returns (v2's uint8
  bicubic kernel is fastest on that layout).
- The output stays uint8 [3, S, S]; normalisation happens per batch on the accelerator.

Randomness comes only from the ``torch.Generator`` passed in, and the crop parameters are drawn
with the exact algorithm and draw order of torchvision's ``RandomResizedCrop.get_params`` followed
by ``RandomHorizontalFlip``, so the output is a pure function of (bytes, generator state) and,
for the same seed, equals ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` under
``torch.manual_seed`` up to interpolation rounding.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image
try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without its image decoders: PIL decodes everything
    decode_jpeg = None
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ["BadImage", "MAEAugment", "RawJPEG", "crop_params", "decode_rgb", "decode_batch",
           "raw_jpeg", "DEFAULT_MAX_PIXELS"]

# Pillow's own warning threshold (Image.MAX_IMAGE_PIXELS): ~ a 9459x9459 image, ~268 MB as RGB.
DEFAULT_MAX_PIXELS = 89_478_485


class BadImage(ValueError):
    """A sample that cannot become a training image; ``kind`` names the reason for counting."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but don't.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the JPEG frame header without decoding; None if it can't be found."""
    info = _jpeg_info(data)
    return None if info is None else info[:2]


def _jpeg_info(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from the JPEG frame header; None if it can't be found."""
    n = len(data)
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                return None
            h = (data[pos + 5] << 8) | data[pos + 6]
            w = (data[pos + 7] << 8) | data[pos + 8]
            return h, w, (data[pos + 9] if pos + 9 < n else 0)
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def _check_pixels(h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise BadImage(
            "too_large",
            f"{w}x{h} = {h * w} pixels exceeds the limit of {max_pixels} "
            "(decompression-bomb guard)",
        )


def _decode_pil(data: bytes, max_pixels: int) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            # our own guard below replaces Pillow's DecompressionBombWarning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(img.height, img.width, max_pixels)
            if img.mode.startswith("I;16"):
                # convert("RGB") would clip 16-bit data to 0/255; keep the top 8 bits instead
                img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
            img = img.convert("RGB")
            arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadImage("undecodable", f"{type(e).__name__}: {e}") from None
    return arr.view(img.height, img.width, 3)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode image bytes to an RGB uint8 tensor [H, W, 3] (a view; strides may be HWC-permuted).

    Grayscale, CMYK, palette and alpha images become RGB. Raises :class:`BadImage` with kind
    ``empty``, ``too_large`` or ``undecodable``.
    """
    if not data:
        raise BadImage("empty", "zero-byte image")
    if decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(data)
        if size is not None:
            _check_pixels(size[0], size[1], max_pixels)
            try:
                with warnings.catch_warnings():
                    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they
                    # remain the fastest here, and PIL takes over if they are ever removed
                    warnings.simplefilter("ignore", DeprecationWarning)
                    chw = decode_jpeg(
                        torch.frombuffer(bytearray(data), dtype=torch.uint8),
                        mode=ImageReadMode.RGB,
                    )
                return chw.permute(1, 2, 0)
            except RuntimeError:
                pass  # PIL gets a second chance (and produces the error message if it fails too)
    return _decode_pil(data, max_pixels)


def crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn exactly like torchvision ``RandomResizedCrop.get_params``.

    Same ops, same order, same number of draws (10 tries, then a centre crop), but from
    ``generator`` instead of the global RNG.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        ).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MAEAugment:
    """decode -> RandomResizedCrop(bicubic, antialias) -> horizontal flip -> uint8 [3, S, S].

    ``aug(data, generator)``; ``generator`` may also be an int seed. Picklable (DataLoader
    workers get a copy).
    """

    def __init__(
        self,
        input_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.input_size = int(input_size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.max_pixels = max_pixels

    def __repr__(self) -> str:
        return (
            f"MAEAugment(input_size={self.input_size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip})"
        )

    def params(
        self, height: int, width: int, generator: torch.Generator
    ) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) for an image of this size; consumes draws from ``generator``."""
        i, j, h, w = crop_params(height, width, self.scale, self.ratio, generator)
        # RandomHorizontalFlip draws torch.rand(1) < p even when it is the last transform
        flip = self.hflip and bool(torch.rand(1, generator=generator) < 0.5)
        return i, j, h, w, flip

    def apply(self, hwc: torch.Tensor, i: int, j: int, h: int, w: int, flip: bool) -> torch.Tensor:
        """Crop then resize an HWC uint8 image with given parameters -> contiguous [3, S, S]."""
        # A CHW view of HWC memory: v2's uint8 bicubic kernel is ~1.6x faster on this layout.
        region = hwc.permute(2, 0, 1)[:, i : i + h, j : j + w]
        out = F.resize(
            region,
            [self.input_size, self.input_size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if flip:
            out = out.flip(-1)
        return out.contiguous()

    def __call__(self, data: bytes, generator: torch.Generator | int) -> torch.Tensor:
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        hwc = decode_rgb(data, self.max_pixels)
        i, j, h, w, flip = self.params(hwc.shape[0], hwc.shape[1], generator)
        return self.apply(hwc, i, j, h, w, flip)


# -- batched decode (``make_loader(decode_device=...)``) ---------------------------------------


class RawJPEG(NamedTuple):
    """An undecoded JPEG plus the augmentation drawn for it: what a worker hands over when the
    decode runs batched in the main process (``decode_batch``)."""

    data: torch.Tensor  # uint8 [nbytes], the file's bytes
    params: tuple[int, int, int, int, bool]  # (top, left, h, w, flip), as MAEAugment.params
    size: tuple[int, int]  # (height, width) from the frame header


def raw_jpeg(data: bytes, aug: MAEAugment, generator: torch.Generator) -> RawJPEG | None:
    """``data`` with crop/flip drawn from ``generator`` exactly as ``aug(data, generator)``
    would draw them, without decoding (the size comes from the JPEG header); None for what the
    batched decoder should not get: non-JPEG, no readable header, not 1 or 3 components (CMYK,
    YCCK): the caller decodes those with ``aug`` instead. Raises BadImage (too_large)."""
    if decode_jpeg is None or data[:3] != b"\xff\xd8\xff":
        return None
    info = _jpeg_info(data)
    if info is None or info[2] not in (1, 3):
        return None
    h, w, _ = info
    _check_pixels(h, w, aug.max_pixels)
    params = aug.params(h, w, generator)
    return RawJPEG(torch.frombuffer(bytearray(data), dtype=torch.uint8), params, (h, w))


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """decode_jpeg on a list (one nvJPEG batch on CUDA); on an error, one by one, None where
    even that fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see decode_rgb
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_batch(
    items: Sequence[torch.Tensor | RawJPEG], aug: MAEAugment, device: str | torch.device
) -> list[torch.Tensor | None]:
    """Images [3, S, S] uint8 on ``device`` for a batch of worker outputs: ``RawJPEG`` items are
    decoded together with ``torchvision.io.decode_jpeg(list, device=...)`` (batched nvJPEG on
    CUDA), then cropped, resized (bicubic, antialias) and flipped there with their own
    parameters (``aug.apply``); tensors (already augmented by a worker) are moved there.

    A JPEG the device decoder rejects (or decodes to another size than its header says) is
    decoded on the CPU (``decode_rgb``: libjpeg-turbo, then PIL) with the same parameters; one
    that fails there too gives None in its slot.
    """
    device = torch.device(device)
    dec_dev = device if device.type == "cuda" else torch.device("cpu")
    out: list[torch.Tensor | None] = [None] * len(items)
    raws = [k for k, it in enumerate(items) if isinstance(it, RawJPEG)]
    for k, it in enumerate(items):
        if not isinstance(it, RawJPEG):
            out[k] = it.to(device, non_blocking=True)
    if not raws:
        return out
    decoded = _decode_jpegs([items[k].data for k in raws], dec_dev)
    for k, chw in zip(raws, decoded):
        it = items[k]
        if chw is not None and tuple(chw.shape) == (3, *it.size):
            out[k] = aug.apply(chw.permute(1, 2, 0), *it.params).to(device, non_blocking=True)
            continue
        try:
            hwc = decode_rgb(it.data.numpy().tobytes(), aug.max_pixels)
        except BadImage:
            continue
        if tuple(hwc.shape[:2]) == it.size:
            out[k] = aug.apply(hwc, *it.params).to(device, non_blocking=True)
    return out
