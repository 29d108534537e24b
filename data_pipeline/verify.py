"""Re-reading shards against their manifest (``mae-scale data verify``): counts, sizes, sha256,
one image member per sample, labels in range, unique keys, unlisted shard files."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from webdataset import gopen

from .index import is_remote
from .shards import MANIFEST_NAME, read_manifest
from .tario import UnsafeSample, iter_tar_samples

__all__ = ["verify_shards"]


class _HashingReader(io.RawIOBase):
    """Read-through file wrapper that hashes what passes, so verify reads each shard once."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.h.update(b)
        self.n += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def verify_shards(out_dir: str | os.PathLike, image_key: str | None = None,
                  label_key: str | None = None) -> list[str]:
    """Re-read every shard against the manifest; return the problems found (empty: all good).

    Checks existence, size, sha256, per-shard sample count, one image member per sample, integer
    in-range labels when the set is labelled, unique keys, and unlisted shard files. A manifest
    written by ``data index`` for foreign shards may lack sha256 (then it is not checked);
    ``image_key`` / ``label_key`` say which members hold the image and label (``keys.py``).
    """
    from .keys import parse_keys

    member_keys = parse_keys(image_key if image_key is not None else _manifest_key(out_dir), label_key)
    out = Path(out_dir)
    try:
        m = read_manifest(out)
    except (OSError, ValueError) as e:
        return [str(e)]
    problems: list[str] = []
    labelled = m["num_classes"] > 0
    keys: set[str] = set()
    for entry in m["shards"]:
        url = entry.get("url")  # `data index`: a remote shard, or a local one elsewhere
        name, path = (url, None) if url and is_remote(url) else (entry["name"], Path(url) if url else out / entry["name"])
        if path is not None and not path.exists():
            problems.append(f"{name}: missing")
            continue
        if path is not None and "bytes" in entry and path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        n = 0
        try:
            f = open(path, "rb") if path is not None else gopen(url, "rb")
        except Exception as e:  # a directory in its place, permissions, a failing command
            problems.append(f"{name}: cannot be opened ({getattr(e, 'strerror', None) or e})")
            continue
        with f:
            r = _HashingReader(f)
            try:
                for _, key, members in iter_tar_samples(r):
                    n += 1
                    found = _sample_problems(key, members, labelled, m["num_classes"], member_keys)
                    problems.extend(f"{name}: {p}" for p in found)
                    if key in keys:
                        problems.append(f"{name}: duplicate key {key}")
                    keys.add(key)
            except MemoryError:
                raise
            except Exception as e:  # tarfile, gzip, zlib, lzma, OSError: a damaged shard
                problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e})")
            try:
                r.drain()
            except OSError as e:
                problems.append(f"{name}: I/O error ({e.strerror or e})")
                continue
        if "sha256" in entry and r.h.hexdigest() != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
        if n != entry["samples"]:
            problems.append(f"{name}: {n} samples, manifest says {entry['samples']}")
    listed = {e["name"] for e in m["shards"]}
    problems.extend(f"{p.name}: shard file not in the manifest"
                    for p in sorted(out.glob(f"{m['prefix']}-*.tar")) if p.name not in listed)
    return problems


def _manifest_key(out_dir) -> str | None:
    """The image_key a ``data index`` manifest was counted with (None: the default)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST_NAME).read_text()).get("image_key")
    except (OSError, ValueError, AttributeError):
        return None


def _sample_problems(
    key: str, members: dict[str, bytes] | None, labelled: bool, num_classes: int, keys=None
) -> list[str]:
    from .augment import BadImage
    from .keys import DEFAULT_KEYS

    keys = keys or DEFAULT_KEYS
    if isinstance(members, UnsafeSample):
        return [f"{key}: unsafe tar member, never extracted ({members.reason})"]
    members = members or {}
    out = []
    image = keys.image(members)
    if image is None:
        out.append(f"{key}: no image member (has {sorted(members)})")
    elif not image:
        out.append(f"{key}: zero-byte image")
    if labelled:
        try:
            label = keys.label(members)
        except BadImage:
            label = -1
        if label < 0:
            out.append(f"{key}: missing or non-integer .{keys.label_key}")
        elif label >= num_classes:
            out.append(f"{key}: label {label} outside [0, {num_classes})")
    return out
