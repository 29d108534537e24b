"""Reading WebDataset tar shards sample by sample, skipping unwanted samples without copying them.

A WebDataset sample is a run of consecutive tar members sharing a key (``KEY.jpg``, ``KEY.cls``;
the key is the member path up to the first dot of its base name, as in webdataset). The writer
(``shards.py``), the counter and the streaming reader (``stream.py``) all use this one grouping,
so a sample's index within a shard means the same thing everywhere.

Unsafe members (an absolute name or one with a ``..`` component, a symbolic or hard link, a
device, a FIFO, any other non-regular type) are never read, followed or written anywhere: the
sample they belong to is yielded as an :class:`UnsafeSample` (an empty members dict carrying the
reason), so it keeps its index and is counted as a bad sample (kind ``unsafe_member``) by the
readers. Directory members carry no sample and are passed over, as webdataset does.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

__all__ = ["split_member_name", "iter_tar_samples", "count_tar_samples", "IMAGE_EXTS",
           "UnsafeSample"]

# the same rule as webdataset.tariterators.base_plus_ext
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# member extensions that hold the image, in order of preference
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")


class UnsafeSample(dict):
    """The members of a sample that holds an unsafe member: always empty (so code that only looks
    for an image member skips it), with ``reason`` naming the first unsafe member."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


def _unsafe(info: tarfile.TarInfo) -> str | None:
    """Why a member must not be used (None: a regular file with a safe relative name)."""
    name = info.name
    if name.startswith("/") or ".." in name.split("/"):
        return f"member {name!r} has an absolute or '..' path"
    if info.issym():
        return f"member {name!r} is a symbolic link (to {info.linkname!r})"
    if info.islnk():
        return f"member {name!r} is a hard link (to {info.linkname!r})"
    if info.ischr() or info.isblk():
        return f"member {name!r} is a device file"
    if info.isfifo():
        return f"member {name!r} is a FIFO"
    if not info.isfile():
        return f"member {name!r} has tar type {info.type!r}, not a regular file"
    return None


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
    A wanted sample with an unsafe member comes as an :class:`UnsafeSample`. Reading ends before
    sample ``stop``. Compressed tars (gzip, bz2, xz) are read whatever their name.
    """
    tf = tarfile.open(fileobj=fileobj, mode="r|*")
    index, key, members, unsafe = -1, None, None, None

    def done() -> dict[str, bytes] | None:
        return UnsafeSample(unsafe) if unsafe is not None and members is not None else members

    try:
        for info in tf:
            if info.isdir():
                continue
            k, ext = split_member_name(info.name)
            if k != key:
                if key is not None:
                    yield index, key, done()
                index, key, unsafe = index + 1, k, None
                if stop is not None and index >= stop:
                    return
                members = {} if want is None or want(index) else None
            why = _unsafe(info)
            if why is not None:
                unsafe = unsafe or why  # never extracted: a link is not followed
            elif members is not None and unsafe is None:
                f = tf.extractfile(info)
                members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield index, key, done()
    finally:
        tf.close()


def count_tar_samples(fileobj: IO[bytes]) -> int:
    """Number of samples (key groups) in a tar stream, reading no member data into memory."""
    return sum(1 for _ in iter_tar_samples(fileobj, want=lambda i: False))
