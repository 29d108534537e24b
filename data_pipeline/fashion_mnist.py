"""Fashion-MNIST (IDX files) -> WebDataset shards that ``make_loader`` and ``verify_shards`` read.

Fashion-MNIST (Xiao et al. 2017, https://arxiv.org/abs/1708.07747) is a small real labelled set
(60k train / 10k test 28x28 grey clothing images, 10 classes) that fits a CPU: the fine-tuning and
linear-probe paths can be run end to end on it. Debian ships it as ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), so no download is needed.

Layout (the same as ``shards.py`` writes, so every reader of shards works unchanged)::

    out/train/train-000000.tar  members KEY.png (lossless grey 'L' PNG) + KEY.cls (ASCII label)
    out/train/manifest.json     mae-scale-shards/1, classes = the 10 class names
    out/val/val-000000.tar ...  from the t10k files
    out/classes.json            the 10 class names, index = label

Samples keep the source order (the IDX files are already class-mixed; the train loader shuffles).
Tars are written under a temporary name and renamed, and a split whose manifest records the same
plan (source checksums + settings) is left alone, so a second call does nothing and an
interrupted one only writes the missing shards.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    _atomic_write_json,
    _file_sha256,
    _tarinfo,
)

__all__ = ["read_idx", "write_fashion_mnist_shards", "CLASSES",
           "DEFAULT_SRC"]

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
# (split, images file, labels file), names as distributed (with or without .gz)
_SPLITS = (("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
           ("val", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip-compressed or plain) as a numpy array of its declared shape and type.

    Raises ValueError (one line) for a file that is not IDX: bad magic, unknown type, or a size
    that does not match the header.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'}, "
                         "expected 0000 + type byte + number of dimensions)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} data bytes), "
                         f"file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find(src: Path, name: str) -> Path:
    for p in (src / f"{name}.gz", src / name):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{src}: no {name}.gz or {name} (Fashion-MNIST IDX files); on "
                            "Debian/Ubuntu: apt-get install dataset-fashion-mnist")


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # 2-D uint8 -> mode 'L'
    return buf.getvalue()


class _Progress:
    """One self-overwriting stderr line per split: images and images/s."""

    def __init__(self, split: str, total: int, enabled: bool) -> None:
        self.split, self.total, self.enabled = split, total, enabled
        self.done = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int = 1, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (final or now - self.last >= 0.5):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\rfashion-mnist {self.split}: {self.done}/{self.total} images, "
                             f"{rate:.0f} img/s   " + ("\n" if final else ""))
            sys.stderr.flush()


def _write_tar(path: Path, keys: list[str], images: np.ndarray, labels: np.ndarray,
               prog: _Progress) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for key, img, label in zip(keys, images, labels):
                    members = {f"{key}.png": _png(img), f"{key}.cls": str(int(label)).encode()}
                    for name, data in members.items():
                        tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                    prog.add()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _up_to_date(out: Path, plan: str) -> bool:
    """The split's manifest records ``plan`` and all its shards exist."""
    mpath = out / MANIFEST_NAME
    if not mpath.exists():
        return False
    m = json.loads(mpath.read_text())
    return m.get("plan") == plan and all((out / s["name"]).exists() for s in m["shards"])


def _write_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 samples_per_shard: int, plan: str, progress: bool) -> Path:
    """Shards + manifest for one split; nothing is rewritten when the manifest has this plan."""
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST_NAME
    if _up_to_date(out, plan):
        return mpath
    plan_file = out / f".{split}-plan.json"
    old_plan = json.loads(plan_file.read_text()).get("plan") if plan_file.exists() else None
    if old_plan != plan and any(out.glob(f"{split}-*.tar")):
        raise ValueError(f"{out} already holds '{split}' shards from other sources or settings; "
                         "write to an empty directory (or delete them) instead")
    _atomic_write_json(plan_file, {"plan": plan})  # shards present from now on are this plan's

    n = len(labels)
    prog = _Progress(split, n, progress)
    entries = []
    for i, s in enumerate(range(0, n, samples_per_shard)):
        e = min(s + samples_per_shard, n)
        path = out / f"{split}-{i:06d}.tar"
        if path.exists():  # complete by construction (renamed into place only when finished)
            prog.add(e - s)
        else:
            keys = [f"{split}_{k:05d}" for k in range(s, e)]
            _write_tar(path, keys, images[s:e], labels[s:e], prog)
        entries.append({"name": path.name, "samples": e - s, "bytes": path.stat().st_size,
                        "sha256": _file_sha256(path)})
    prog.add(0, final=True)
    _atomic_write_json(mpath, {
        "format": MANIFEST_FORMAT, "prefix": split, "shards": entries, "total": n,
        "num_classes": len(CLASSES), "classes": list(CLASSES),
        "samples_per_shard": samples_per_shard, "max_bytes_per_shard": None, "seed": None,
        "plan": plan, "source": "fashion-mnist",
    })
    return mpath


def write_fashion_mnist_shards(
    out_dir: str | os.PathLike,
    src_dir: str | os.PathLike = DEFAULT_SRC,
    samples_per_shard: int = 10000,
    train_limit: int | None = None,
    val_limit: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``out_dir/train`` (60k) and ``out_dir/val`` (10k, the t10k files) shards plus
    ``out_dir/classes.json``; return ``{"train": manifest path, "val": manifest path}``.

    ``train_limit`` / ``val_limit``: keep only the first N samples of a split. Idempotent (see the
    module docstring). A missing ``src_dir`` is a FileNotFoundError naming the Debian package.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found at {src}; install it with "
                                "`apt-get install dataset-fashion-mnist` or pass --src DIR")
    # Every source file is found before anything is written; each split makes its own folder
    # (out/train, out/val) only once its files have decoded, so bad sources leave no empty OUT.
    sources = [(_find(src, img_name), _find(src, lbl_name)) for _, img_name, lbl_name in _SPLITS]
    result: dict[str, Path] = {}
    for (split, _, _), (img_path, lbl_path), limit in zip(_SPLITS, sources, (train_limit, val_limit)):
        settings = [split, samples_per_shard, limit, _file_sha256(img_path),
                    _file_sha256(lbl_path), "png-L/1"]
        plan = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
        if _up_to_date(out / split, plan):  # the second call: not even the sources are decoded
            result[split] = out / split / MANIFEST_NAME
            continue
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(f"{img_path}, {lbl_path}: expected uint8 images [N, H, W] and N "
                             f"labels, got {images.dtype} {images.shape} and {labels.shape}")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASSES):
            raise ValueError(f"{lbl_path}: labels outside 0..{len(CLASSES) - 1}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        result[split] = _write_split(out / split, split, images, labels, samples_per_shard, plan,
                                     progress)
    classes = out / "classes.json"
    if not classes.exists() or json.loads(classes.read_text()) != list(CLASSES):
        _atomic_write_json(classes, list(CLASSES))
    return result
