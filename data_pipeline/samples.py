"""Tiny real-photo data for demos, smoke runs and tests, made offline.

No data set can be downloaded here, but scikit-image and scikit-learn ship a few real photographs
(CC0 / public domain / CC BY 2.0). Each photo becomes one class; its images are random crops,
flips and rescales of it at ImageNet-like sizes (e.g. 500x375), saved as quality-90 JPEGs in an
ImageNet-style tree ``<out>/train/<synset>/<synset>_<index>.JPEG``. That is realistic enough for
the decode/augment cost and for MAE reconstructions to look like something.

``builtin_shards`` turns such a folder into WebDataset shards once per cache directory; the
engine uses it for ``data.train_shards: builtin``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_sample_folder", "builtin_shards", "load_source_photos"]

# Fixed list so the class set only depends on what the installed packages ship. Only photographs
# that ship inside the scikit-image wheel (the others need a download and are skipped anyway);
# masks, logos, text and tiny images are left out.
_SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "brick",
    "clock",
    "coins",
    "grass",
    "gravel",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "cell",
)
_SKLEARN_PHOTOS = ("china", "flower")

# ImageNet-like aspect ratios (long/short side)
_ASPECTS = (1.0, 4 / 3, 4 / 3, 3 / 2)

_DONE_MARKER = ".complete.json"


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def load_source_photos() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 HxWx3) for every bundled photo that loads offline, in a fixed order."""
    photos: list[tuple[str, np.ndarray]] = []
    import skimage.data  # local: heavy import, only needed when making samples

    for name in _SKIMAGE_PHOTOS:
        try:
            loader: Callable[[], object] = getattr(skimage.data, name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = loader()
        except Exception:  # missing in this version, or needs a download: skip it
            continue
        if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
            arr = arr[0]
        photos.append((name, _to_rgb(np.asarray(arr))))
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for fname, arr in zip(bunch.filenames, bunch.images):
            name = Path(fname).stem
            if name in _SKLEARN_PHOTOS:
                photos.append((name, _to_rgb(arr)))
    except Exception:
        pass
    if not photos:
        raise RuntimeError("no bundled sample photo could be loaded (scikit-image / scikit-learn)")
    return photos


def _render(
    photo: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int
) -> Image.Image:
    """One ImageNet-sized random crop/flip/rescale of ``photo``."""
    long_side = int(rng.integers(max(min_side, 1), max_side + 1))
    aspect = float(_ASPECTS[rng.integers(len(_ASPECTS))])
    short_side = max(min_side, min(long_side, round(long_side / aspect)))
    out_w, out_h = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
    ph, pw = photo.shape[:2]
    # the largest source box of the output's aspect ratio, shrunk by a random factor
    box_w = min(pw, ph * out_w / out_h)
    box_h = box_w * out_h / out_w
    shrink = float(np.sqrt(rng.uniform(0.35, 1.0)))
    box_w, box_h = box_w * shrink, box_h * shrink
    left = rng.uniform(0, pw - box_w)
    top = rng.uniform(0, ph - box_h)
    img = Image.fromarray(photo).resize(
        (out_w, out_h), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h)
    )
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def make_sample_folder(
    out_dir: str | os.PathLike,
    n_images: int = 256,
    seed: int = 0,
    min_side: int = 300,
    max_side: int = 500,
) -> Path:
    """Write ``out_dir/train/<synset>/<synset>_<i>.JPEG`` (JPEG q90) and return ``out_dir``.

    Class ``k`` is source photo ``k`` (synset ``n{k:04d}_{name}``, so sorted order = k); image
    ``i`` belongs to class ``i % num_classes``. Deterministic for a seed; a second call with the
    same arguments returns at once (a marker file records a finished folder).
    """
    if n_images < 1 or not 0 < min_side <= max_side:
        raise ValueError(f"need n_images >= 1 and 0 < min_side <= max_side, got {n_images}, "
                         f"{min_side}, {max_side}")
    out = Path(out_dir)
    params = {"n_images": n_images, "seed": seed, "min_side": min_side, "max_side": max_side}
    marker = out / _DONE_MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("params") == params:
                return out
        except (OSError, ValueError):
            pass
    photos = load_source_photos()
    root = out / "train"
    for i in range(n_images):
        k = i % len(photos)
        name, photo = photos[k]
        synset = f"n{k:04d}_{name}"
        path = root / synset / f"{synset}_{i:06d}.JPEG"
        # one generator per image: the folder does not depend on write order or on reruns
        rng = np.random.default_rng([seed, i])
        img = _render(photo, rng, min_side, max_side)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        img.save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)
    used = range(min(n_images, len(photos)))
    classes = [f"n{k:04d}_{photos[k][0]}" for k in used]
    tmp_marker = out / f"{_DONE_MARKER}.tmp-{os.getpid()}"
    tmp_marker.write_text(json.dumps({"params": params, "classes": classes}, indent=1))
    os.replace(tmp_marker, marker)
    return out


def builtin_shards(
    cache_dir: str | os.PathLike,
    n_images: int = 1024,
    samples_per_shard: int = 128,
    seed: int = 0,
) -> Path:
    """Shards of the built-in sample photos under ``cache_dir``, made once; returns the shard dir.

    The directory holds ``manifest.json``. Concurrent callers (e.g. every rank of a job) are
    safe: each builds in a private temporary directory and atomically renames it into place;
    a loser of the race discards its copy and uses the winner's.
    """
    from .shards import read_manifest, write_shards  # local: shards imports nothing from here

    cache = Path(cache_dir)
    final = cache / f"builtin-n{n_images}-s{samples_per_shard}-seed{seed}"
    shard_dir = final / "shards"
    if (shard_dir / "manifest.json").exists():
        read_manifest(shard_dir)  # fail loudly on a damaged cache rather than train on it
        return shard_dir
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        make_sample_folder(tmp / "images", n_images=n_images, seed=seed)
        write_shards(tmp / "images", tmp / "shards", samples_per_shard=samples_per_shard,
                     seed=seed, progress=False)
        try:
            os.rename(tmp, final)
        except OSError:
            # another process won the race (rename onto a non-empty dir fails): use its copy
            if not (shard_dir / "manifest.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return shard_dir
