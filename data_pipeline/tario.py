"""Reading WebDataset tar shards sample by sample, skipping unwanted samples without copying them.

A WebDataset sample is a run of consecutive tar members sharing a key (``KEY.jpg``, ``KEY.cls``;
the key is the member path up to the first dot of its base name, as in webdataset). The writer
(``shards.py``), the counter and the streaming reader (``stream.py``) all use this one grouping,
so a sample's index within a shard means the same thing everywhere.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

__all__ = ["split_member_name", "iter_tar_samples", "count_tar_samples", "IMAGE_EXTS"]

# the same rule as webdataset.tariterators.base_plus_ext
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# member extensions that hold the image, in order of preference
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")


def split_member_name(name: str) -> tuple[str, str]:
    """``"a/b.seg.jpg"`` -> ``("a/b", "seg.jpg")``; a name without a dot: key with ext ``""``."""
    m = _KEY_RE.match(name)
    if m is None:
        return name, ""
    return m.group(1), m.group(2).lower()


def iter_tar_samples(
    fileobj: IO[bytes],
    want: Callable[[int], bool] | None = None,
    stop: int | None = None,
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield ``(index, key, {ext: bytes})`` for each sample of a tar stream, in order.

    When ``want(index)`` is False the sample is yielded with ``None`` instead of its members and
    their data is never read into memory (the stream still passes over it: tar has no index).
    Reading ends before sample ``stop``.
    """
    tf = tarfile.open(fileobj=fileobj, mode="r|*")
    index, key, members = -1, None, None
    try:
        for info in tf:
            if not info.isfile():
                continue
            k, ext = split_member_name(info.name)
            if k != key:
                if key is not None:
                    yield index, key, members
                index, key = index + 1, k
                if stop is not None and index >= stop:
                    return
                members = {} if want is None or want(index) else None
            if members is not None:
                f = tf.extractfile(info)
                members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield index, key, members
    finally:
        tf.close()


def count_tar_samples(fileobj: IO[bytes]) -> int:
    """Number of samples (key groups) in a tar stream, reading no member data into memory."""
    return sum(1 for _ in iter_tar_samples(fileobj, want=lambda i: False))
