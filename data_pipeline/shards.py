"""Write an image folder or a file list to WebDataset tar shards with a manifest; verify them.

Shards let every rank stream large sequential reads instead of millions of small-file opens, and
the manifest (sample counts, sizes, sha256) lets the loader know the epoch length without reading
a byte of data (``stream.py``). Layout::

    out_dir/train-000000.tar   members KEY.jpg (the source file's bytes, never re-encoded)
                                       KEY.cls (label as ASCII integer; labelled sources only)
    out_dir/manifest.json      {"format": "mae-scale-shards/1", "prefix", "shards": [{"name",
                                "samples", "bytes", "sha256"}], "total", "num_classes", "classes",
                                "samples_per_shard", "max_bytes_per_shard", "seed", "plan"}
    out_dir/_info.json         timm's split info (splits.<prefix>: num_samples, filenames,
                                shard_lengths), for timm / Hugging Face WebDataset readers
    out_dir/shardindex.json    a wids index (shardlist: url, nsamples, filesize), for wids

A shard holds at most ``samples_per_shard`` samples and, when ``max_bytes_per_shard`` is set, at
most that many bytes (unless one sample alone is larger).

Samples are shuffled across shards by ``seed`` so each shard mixes classes. Every tar is written
under a hidden temporary name, fsynced and renamed, so a file with a shard's name is always
complete; a rerun after an interruption writes only the missing shards.

Input a run cannot work with (no images, two files with one key, a file list naming a missing file
or a non-integer label, a source file that cannot be read, an output path that is a file or
already holds other shards, a limit below 1) raises :class:`DataInputError` with one line that
says what to do. Source folders are walked following symbolic links, but a directory reached
a second time (a symlink loop, or two links to one folder) is not read again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataInputError
from .tario import IMAGE_EXTS

__all__ = ["write_shards", "read_manifest", "MANIFEST_FORMAT", "MANIFEST_NAME"]

MANIFEST_FORMAT = "mae-scale-shards/1"
MANIFEST_NAME = "manifest.json"
_SOURCE_EXTS = frozenset("." + e for e in IMAGE_EXTS) | {".jpe"}


@dataclass(frozen=True)
class _Item:
    path: Path
    key: str
    ext: str  # member extension: "jpg" for any JPEG name, else the file's own suffix
    label: int | None


def _member_ext(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return "jpg" if suffix in ("jpg", "jpeg", "jpe") else suffix


def _make_key(rel: str) -> str:
    # webdataset cuts the key at the first dot of the base name, so no dot may remain in it
    rel = rel.replace(os.sep, "/").lstrip("/")
    while rel.startswith("./"):
        rel = rel[2:]
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return stem.replace(".", "_")


def _dir_id(d: Path) -> tuple[int, int]:
    st = os.stat(d)
    return st.st_dev, st.st_ino


def _images_under(d: Path, blocked: frozenset[tuple[int, int]] = frozenset()) -> list[Path]:
    """Images under ``d``, following symbolic links into directories, but never into one
    already read (a symlink loop, or a second link to it) nor into a ``blocked`` one (the source
    root and the other classes: a link there would copy their images under this label)."""
    out = []
    seen: set[tuple[int, int]] = set(blocked)  # (device, inode) of each directory read
    for root, dirs, files in os.walk(d, followlinks=True, onerror=_walk_error):
        try:
            ident = _dir_id(Path(root))
        except OSError:
            dirs[:] = []
            continue
        if ident in seen:
            dirs[:] = []
            continue
        seen.add(ident)
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(
            Path(root) / f
            for f in sorted(files)
            if not f.startswith(".") and Path(f).suffix.lower() in _SOURCE_EXTS
        )
    return out


def _walk_error(e: OSError) -> None:
    # a folder that cannot be listed would silently lose its images
    raise DataInputError(f"cannot list {e.filename}: {e.strerror or e}; fix its permissions "
                         "or leave it out of the source")


def _collect(src: Path) -> tuple[list[_Item], list[str] | None, int]:
    """(items in a stable order, class names or None, num_classes) for any supported source."""
    if src.is_file():
        return _collect_list(src)
    if not src.is_dir():
        raise DataInputError(f"source {src} is neither a directory nor a file list")
    root = src / "train" if (src / "train").is_dir() else src
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_dirs:
        classes = [d.name for d in class_dirs]
        ids = {_dir_id(root)} | {_dir_id(d) for d in class_dirs}
        items = [
            _Item(p, _make_key(str(p.relative_to(root))), _member_ext(p), label)
            for label, d in enumerate(class_dirs)
            for p in _images_under(d, frozenset(ids - {_dir_id(d)}))
        ]
        return items, classes, len(classes)
    items = [_Item(p, _make_key(p.name), _member_ext(p), None) for p in _images_under(root)]
    return items, None, 0


def _collect_list(list_file: Path) -> tuple[list[_Item], None, int]:
    items: list[_Item] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_s, _, label_s = line.rstrip("\n").partition("\t")
        label: int | None = None
        if label_s.strip():
            try:
                label = int(label_s.strip())
            except ValueError:
                msg = f"{list_file}:{lineno}: label {label_s!r} is not an integer"
                raise DataInputError(msg) from None
            if label < 0:
                raise DataInputError(f"{list_file}:{lineno}: negative label {label}")
        p = Path(path_s.strip())
        full = p if p.is_absolute() else list_file.parent / p
        if not full.is_file():
            raise DataInputError(f"{list_file}:{lineno}: {full} is not a file (missing?); fix or "
                                 "remove that line")
        items.append(_Item(full, _make_key(path_s.strip()), _member_ext(p), label))
    labelled = {it.label is not None for it in items}
    if len(labelled) > 1:
        raise DataInputError(f"{list_file}: some lines have a label and some don't; "
                             "label all or none")
    num_classes = max((it.label for it in items if it.label is not None), default=-1) + 1
    return items, None, num_classes


def _check_sources(items: list[_Item]) -> None:
    """Refuse two sources with one key, and a source that is not a readable regular file (a
    dangling or looping symbolic link, a FIFO), before any shard is written."""
    seen: dict[str, Path] = {}
    for it in items:
        try:
            regular = it.path.is_file() and os.access(it.path, os.R_OK)
        except OSError:
            regular = False
        if not regular:
            raise DataInputError(f"source {it.path} is not a readable file (a broken or looping "
                                 "symbolic link?); fix or remove it")
        if it.key in seen:
            raise DataInputError(
                f"two sources map to the same sample key {it.key!r}: {seen[it.key]} and {it.path} "
                "(keys are paths without extension, dots replaced by '_'); rename one"
            )
        seen[it.key] = it.path


def _plan_hash(items: list[_Item], prefix: str, samples_per_shard: int, seed: int,
               max_bytes_per_shard: int | None = None) -> str:
    settings: list = [prefix, samples_per_shard, seed]
    if max_bytes_per_shard is not None:  # absent when unset: older plans keep their hash
        settings.append(max_bytes_per_shard)
    h = hashlib.sha256(json.dumps(settings).encode())
    for it in items:
        h.update(f"{it.key}\0{it.ext}\0{it.label}\0{it.path.stat().st_size}\n".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a PAX tar written by ``_write_tar``: its header block(s) (with a
    PAX extended header when the name needs one) plus data padded to 512."""
    header = _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return len(header) + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _sample_bytes(it: _Item) -> int:
    n = _member_bytes(f"{it.key}.{it.ext}", it.path.stat().st_size)
    if it.label is not None:
        n += _member_bytes(f"{it.key}.cls", len(str(it.label).encode()))
    return n


def _tar_bytes(members: int) -> int:
    """File size of a tar whose members take ``members`` bytes: + end blocks, record padding."""
    n = members + 2 * tarfile.BLOCKSIZE
    return -(-n // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _split(items: list[_Item], samples_per_shard: int,
           max_bytes_per_shard: int | None) -> list[list[_Item]]:
    """Cut ``items`` (in order) into shards: a shard closes when the next sample would pass
    ``samples_per_shard`` or make the tar file larger than ``max_bytes_per_shard`` (a sample
    too large on its own gets a shard to itself). Exact tar sizes, from source sizes."""
    if max_bytes_per_shard is None:
        return [items[s : s + samples_per_shard] for s in range(0, len(items), samples_per_shard)]
    chunks: list[list[_Item]] = []
    cur: list[_Item] = []
    used = 0
    for it in items:
        n = _sample_bytes(it)
        if cur and (len(cur) >= samples_per_shard or _tar_bytes(used + n) > max_bytes_per_shard):
            chunks.append(cur)
            cur, used = [], 0
        cur.append(it)
        used += n
    if cur:
        chunks.append(cur)
    return chunks


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # fixed metadata so a rewritten shard is byte-identical (same sha256) to the first one
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _write_tar(path: Path, items: Iterable[_Item], on_sample: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for it in items:
                    try:
                        data = it.path.read_bytes()
                    except OSError as e:  # checked readable at the start; gone or failing now
                        raise DataInputError(f"cannot read source {it.path}: {e.strerror or e}; "
                                             "fix it and run the same command again (finished "
                                             "shards are kept)") from None
                    tf.addfile(_tarinfo(f"{it.key}.{it.ext}", len(data)), io.BytesIO(data))
                    if it.label is not None:
                        cls = str(it.label).encode()
                        tf.addfile(_tarinfo(f"{it.key}.cls", len(cls)), io.BytesIO(cls))
                    on_sample()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Progress:
    """One self-overwriting stderr line: shards, images, images/s, ETA."""

    def __init__(self, total: int, shards: int, enabled: bool) -> None:
        self.total, self.shards, self.enabled = total, shards, enabled
        self.done = self.written = self.shards_done = 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def skip(self, n: int) -> None:
        with self.lock:
            self.done += n
            self.shards_done += 1

    def sample(self) -> None:
        with self.lock:
            self.done += 1
            self.written += 1
            now = time.monotonic()
            if self.enabled and now - self.last >= 0.5:
                self.last = now
                self._print(now)

    def shard(self) -> None:
        with self.lock:
            self.shards_done += 1

    def _print(self, now: float, end: str = "") -> None:
        rate = self.written / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        sys.stderr.write(
            f"\rwrite_shards: {self.shards_done}/{self.shards} shards, {self.done}/{self.total} "
            f"images, {rate:.0f} img/s, ETA {eta_s}   {end}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(time.monotonic(), end="\n")


def write_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    max_bytes_per_shard: int | None = None,
    seed: int = 0,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write ``src`` to ``out_dir/<prefix>-NNNNNN.tar`` shards plus ``manifest.json``; return it.

    ``src``: an ImageNet-style folder (``src/<synset>/...`` or ``src/train/<synset>/...``; label =
    index of the synset in sorted order), a plain folder of images (no labels), or a text file
    with one image path per line (relative to the file), optionally followed by ``\\t<label>``.
    Idempotent: shards that already exist from the same plan (same sources, sizes, labels,
    ``prefix``, ``samples_per_shard``, ``seed``) are kept; a different plan in the same
    directory is an error. ``num_workers`` threads write shards in parallel (I/O bound).

    ``max_bytes_per_shard``: also close a shard before the sample that would make its tar file
    larger than this many bytes (exact tar size, computed from the source file sizes; a single
    sample larger than the limit gets a shard of its own). Part of the plan and the manifest.
    """
    if samples_per_shard < 1:
        raise DataInputError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_bytes_per_shard is not None and max_bytes_per_shard < 1:
        raise DataInputError(
            f"max_bytes_per_shard must be >= 1 or None, got {max_bytes_per_shard}")
    if not prefix or "/" in prefix or "." in prefix:
        raise DataInputError(f"prefix must be a plain name without '/' or '.', got {prefix!r}")
    items, classes, num_classes = _collect(Path(src))
    if not items:
        raise DataInputError(f"no images found in {src} (extensions: {sorted(_SOURCE_EXTS)})")
    _check_sources(items)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataInputError(f"output {out} is a file, not a directory; give a new or empty "
                             "directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataInputError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    plan = _plan_hash(items, prefix, samples_per_shard, seed, max_bytes_per_shard)
    _claim_dir(out, plan, prefix)

    order = np.random.default_rng(seed).permutation(len(items))
    chunks = _split([items[i] for i in order], samples_per_shard, max_bytes_per_shard)
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(chunks))]
    prog = _Progress(len(items), len(chunks), progress)

    def one(i: int) -> dict:
        path = out / names[i]
        if path.exists():  # complete by construction: only a finished tar is ever renamed here
            prog.skip(len(chunks[i]))
        else:
            _write_tar(path, chunks[i], prog.sample)
            prog.shard()
        return {"name": names[i], "samples": len(chunks[i]), "bytes": path.stat().st_size,
                "sha256": _file_sha256(path)}

    try:
        if num_workers > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                entries = list(pool.map(one, range(len(chunks))))
        else:
            entries = [one(i) for i in range(len(chunks))]
    finally:
        prog.close()

    manifest = {
        "format": MANIFEST_FORMAT,
        "prefix": prefix,
        "shards": entries,
        "total": len(items),
        "num_classes": num_classes,
        "classes": classes,
        "samples_per_shard": samples_per_shard,
        "max_bytes_per_shard": max_bytes_per_shard,
        "seed": seed,
        "plan": plan,
    }
    _atomic_write_json(out / MANIFEST_NAME, manifest)
    _write_foreign_indexes(out, prefix, entries)
    return manifest


def _write_foreign_indexes(out: Path, prefix: str, entries: list[dict]) -> None:
    """The same counts in the two index formats other readers know, so the shards need no pre-read
    there either: timm's ``_info.json`` (split = the prefix, as timm's ``reader_wds`` reads it) and a
    wids index (``shardindex.json``, wids' default name; URLs relative to the folder)."""
    _atomic_write_json(out / "_info.json", {"name": prefix, "splits": {prefix: {
        "name": prefix, "num_samples": sum(e["samples"] for e in entries),
        "filenames": [e["name"] for e in entries], "shard_lengths": [e["samples"] for e in entries]}}})
    _atomic_write_json(out / "shardindex.json", {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": prefix,
        "shardlist": [{"url": e["name"], "nsamples": e["samples"], "filesize": e["bytes"]} for e in entries]})


def _plan_in(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("plan")
    except (OSError, ValueError, AttributeError):
        return None


_TAR_NAME = re.compile(r".*\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz)$")


def _claim_dir(out: Path, plan: str, prefix: str) -> None:
    """Record this plan in ``out``; refuse to mix shards of a different plan into it, to put a
    manifest over another shard set's, or to write beside tars that are not this plan's."""
    if (out / MANIFEST_NAME).exists() and _plan_in(out / MANIFEST_NAME) != plan:
        raise DataInputError(
            f"{out} already holds a shard set (manifest.json) written from different sources or "
            "settings; write to a new or empty directory, or delete that manifest and its "
            "shards first"
        )
    ours = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    foreign = sorted(p.name for p in out.iterdir()
                     if _TAR_NAME.fullmatch(p.name) and not ours.fullmatch(p.name))
    if foreign:
        raise DataInputError(
            f"{out} holds tar files that are not '{prefix}' shards of make-shards ({foreign[0]}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); write to a new or "
            "empty directory"
        )
    plan_file = out / f".{prefix}-plan.json"
    if plan_file.exists():
        if _plan_in(plan_file) == plan:
            return
        if any(out.glob(f"{prefix}-*.tar")):
            raise DataInputError(
                f"{out} already holds '{prefix}' shards written from different sources or "
                "settings; write to a new or empty directory (or delete those shards) instead"
            )
    elif any(out.glob(f"{prefix}-*.tar")):
        raise DataInputError(f"{out} holds '{prefix}-*.tar' files not written by make-shards; "
                             "write to a new or empty directory")
    _atomic_write_json(plan_file, {"plan": plan})


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(path_or_dir: str | os.PathLike) -> dict:
    """Load and sanity-check a manifest (a ``manifest.json`` path or the directory holding one)."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {p}; run write_shards first") from None
    except (OSError, ValueError) as e:  # unreadable, or not JSON (e.g. cut short)
        raise DataInputError(f"{p} cannot be read as a manifest ({e}); write the shards again "
                             "with make-shards") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DataInputError(f"{p} is not a {MANIFEST_FORMAT} manifest (format={got!r})")
    missing = {"prefix", "shards", "total", "num_classes", "classes"} - m.keys()
    if missing:
        raise DataInputError(f"{p} lacks fields {sorted(missing)}")
    try:
        ok = all(isinstance(s["name"], str) and int(s["samples"]) >= 0 for s in m["shards"])
        ok = ok and sum(int(s["samples"]) for s in m["shards"]) == m["total"]
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DataInputError(f"{p}: shard entries lack a name or sample count, or their counts "
                             f"do not add up to total={m['total']}")
    return m

