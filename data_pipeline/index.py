"""Sample counts of shards written by others, without reading their data (and ``mae-scale data index``).

The loader must know each shard's sample count before step 0 (equal per-rank lengths, exact resume:
``stream.py``). Counts are taken from the first of these that covers every shard asked for:

1. our ``manifest.json`` (``make-shards``, or an earlier ``data index`` / header scan);
2. timm's ``_info.json`` (timm and Hugging Face WebDataset exports, e.g. ``timm/imagenet-1k-wds``):
   ``{"splits": {"train": {"num_samples": N, "filenames": [...], "shard_lengths": [...]}, ...}}``;
   ``splits`` may also be a list of such objects carrying ``"name"``, and ``filenames`` may hold
   brace patterns. Per-shard counts come from ``shard_lengths``; without them only a one-shard
   split is counted (``num_samples``), the rest is left to step 5;
3. a wids index (any other ``*.json`` in the shards' folder, e.g. wids' own ``shardindex.json``):
   ``{"shardlist": [{"url": ..., "nsamples": N}, ...]}``, URLs relative to the index's folder;
4. img2dataset's ``NNNNN_stats.json`` beside each ``NNNNN.tar``: ``successes`` (the samples written;
   ``count`` is what was attempted, failures included, so it is not used);
5. local tars only: their headers (``tarscan.py``: 512 bytes read per member, the data seeked
   over), in parallel. The counts are cached per folder in ``~/.cache/mae-scale/index`` (or
   ``$MAE_SCALE_INDEX_CACHE``) with each tar's size and mtime, not in the shards' folder (often
   read-only or shared, and reading must not change it); ``mae-scale data index`` writes our
   ``manifest.json`` there when asked.

Remote shards (``pipe:`` commands, URLs) have no folder to look in: without an index (a manifest or
wids index naming them) they are refused before any work (``data index`` writes one, reading each
shard once), unless the loader runs resampled (``stream.py``), which needs no counts.

A manifest written here has ``"source": "index"``; its entries may carry a ``url`` (remote shards,
or shards outside the manifest's folder), ``bytes`` (a cached count whose tar changed size is
recounted) and, with ``--checksums``, ``sha256``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from braceexpand import braceexpand

from .errors import DataInputError
from .keys import DEFAULT_KEYS, SampleKeys
from .tarscan import TarCount, count_local_tar

__all__ = ["is_remote", "index_counts", "scan_counts", "index_shards", "json_index",
           "remote_refusal", "INDEX_FORMATS"]

MANIFEST_NAME = "manifest.json"
INDEX_FORMATS = ("our manifest.json", "timm _info.json (shard_lengths)",
                 "a wids index (shardlist with nsamples)", "img2dataset *_stats.json")
_MAX_INDEX_BYTES = 256 << 20
_PROCESS_MIN = 256  # tars from which counting is spread over processes (start-up ~1-2 s each)


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def remote_refusal(n: int) -> DataInputError:
    return DataInputError(
        f"{n} shard(s) are remote (pipe: or URLs) and no index gives their sample counts; write one with "
        "`mae-scale data index SHARDS --out manifest.json` and point at it, or give "
        f"{', '.join(INDEX_FORMATS[1:])}; or set data.resampled=true with data.epoch_samples (no counts needed)")


def _load_json(path: Path):
    try:
        if path.stat().st_size > _MAX_INDEX_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- the index formats: each gives {url: count} --------------------------------------------------


def _ours(m: dict, folder: Path) -> dict[str, int]:
    out = {}
    for s in m.get("shards", []):
        if isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int):
            out[s.get("url") or str(folder / s["name"])] = s["samples"]
    return out


def _timm_splits(info: dict) -> dict[str, dict]:
    splits = info.get("splits")
    if isinstance(splits, list):
        splits = {s.get("name"): s for s in splits if isinstance(s, dict)}
    return {k: v for k, v in splits.items() if isinstance(v, dict)} if isinstance(splits, dict) else {}


def _timm(split: dict, folder: Path) -> dict[str, int]:
    names = [n for pat in split.get("filenames") or [] if isinstance(pat, str) for n in braceexpand(pat)]
    lengths = split.get("shard_lengths")
    if isinstance(lengths, list) and len(lengths) == len(names) and all(isinstance(c, int) for c in lengths):
        return {_join(folder, n): c for n, c in zip(names, lengths)}
    if len(names) == 1 and isinstance(split.get("num_samples"), int):
        return {_join(folder, names[0]): split["num_samples"]}
    return {}


def _wids(desc: dict, folder: Path) -> dict[str, int]:
    out = {}
    for s in desc.get("shardlist") or []:
        if isinstance(s, dict) and isinstance(s.get("url"), str) and isinstance(s.get("nsamples"), int):
            out[_join(folder, s["url"])] = s["nsamples"]
    return out


def _join(folder: Path, name: str) -> str:
    return name if is_remote(name) or os.path.isabs(local_path(name)) else str(folder / name)


def json_index(path: str) -> tuple[list[str], list[int]]:
    """(urls, counts) of a JSON index given as the shard spec: our manifest, a wids index, or timm's
    ``_info.json`` (``_info.json#SPLIT`` names the split when there are several)."""
    path, _, split = path.partition("#")
    p = Path(path)
    data = _load_json(p)
    if not isinstance(data, dict):
        raise DataInputError(f"{p} cannot be read as a JSON shard index")
    folder = p.parent
    if "shardlist" in data:
        counts = _wids(data, folder)
    elif "splits" in data:
        splits = _timm_splits(data)
        if not split and len(splits) != 1:
            raise DataInputError(f"{p} describes splits {sorted(splits)}; name one, e.g. {p}#{next(iter(sorted(splits)), 'train')}")
        if (split or next(iter(splits))) not in splits:
            raise DataInputError(f"{p} has no split {split!r} (it has {sorted(splits)})")
        counts = _timm(splits[split or next(iter(splits))], folder)
        if not counts:
            raise DataInputError(f"{p}: split {split or next(iter(splits))!r} lists no filenames with "
                                 "shard_lengths; count the shards with `mae-scale data index`")
    else:
        raise DataInputError(f"{p} is neither our manifest, a wids index (shardlist) nor timm's _info.json (splits)")
    if not counts:
        raise DataInputError(f"{p} lists no shards")
    return list(counts), list(counts.values())


def index_counts(urls: Sequence[str]) -> tuple[list[int], str] | None:
    """Counts of every url from an index file beside them (formats 1-4 of the module docstring),
    and which one; None when no single index covers them all. Reads no tar."""
    local = [Path(local_path(u)) for u in urls if not is_remote(u)]
    if len(local) != len(urls) or not urls:
        return None
    folders = {p.parent for p in local}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    want = [str(p) for p in local]
    candidates: list[tuple[str, Callable[[], dict[str, int]]]] = []
    m = _load_json(folder / MANIFEST_NAME)
    if isinstance(m, dict) and "shards" in m:
        candidates.append(("manifest.json", lambda: _ours(m, folder)))
    info = _load_json(folder / "_info.json")
    if isinstance(info, dict):
        for name, split in _timm_splits(info).items():
            candidates.append((f"_info.json split {name}", lambda s=split: _timm(s, folder)))
    try:
        others = sorted(p for p in folder.glob("*.json") if p.name not in (MANIFEST_NAME, "_info.json")
                        and not p.name.endswith("_stats.json"))
    except OSError:
        others = []
    for p in others[:64]:  # index files, not a folder of per-sample JSON
        desc = _load_json(p)
        if isinstance(desc, dict) and "shardlist" in desc:
            candidates.append((f"wids index {p.name}", lambda d=desc: _wids(d, folder)))
    for what, get in candidates:
        counts = get()
        if all(u in counts for u in want):
            return [counts[u] for u in want], what
    stats = []
    for p in local:
        s = _load_json(p.with_name(p.name.split(".", 1)[0] + "_stats.json"))
        if not isinstance(s, dict) or not isinstance(s.get("successes"), int):
            return None
        stats.append(s["successes"])
    return stats, "img2dataset _stats.json"


# -- counting by headers, in parallel, with progress -----------------------------------------------


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.bytes = total, enabled, 0, 0
        self.start = self.last = time.monotonic()

    def step(self, c: TarCount) -> None:
        self.done += 1
        self.bytes += c.bytes_read
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.5 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            sys.stderr.write(f"\rindex: {self.done}/{self.total} tars, {rate:.0f} tars/s, "
                             f"{self.bytes / 2**20:.1f} MiB read, ETA {eta:.0f} s   ")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _count_any(url: str, keys: SampleKeys) -> TarCount:
    if not is_remote(url):
        return count_local_tar(local_path(url), keys)
    from .shard_read import count_shard  # a pipe cannot seek: its bytes pass once

    n, problem = count_shard(url)
    return TarCount(n, n, 0, 0, "stream", None if problem is None else f"{problem.kind}: {problem.reason}")


def scan_counts(urls: Sequence[str], keys: SampleKeys = DEFAULT_KEYS, workers: int | None = None,
                progress: bool = False) -> list[TarCount]:
    """Count every shard (headers of local plain tars, else streamed), ``workers`` at a time."""
    workers = workers or min(16, (os.cpu_count() or 1) * 2)
    prog = _Progress(len(urls), progress)
    procs = min(workers, os.cpu_count() or 1)
    if procs > 1 and len(urls) >= _PROCESS_MIN and not any(is_remote(u) for u in urls):
        # parsing ~2,500 headers per tar is Python work that holds the GIL: for a large set,
        # processes (spawned: the caller may hold threads and a CUDA context) beat threads
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=procs, mp_context=mp.get_context("spawn")) as pool:
            out = []
            for c in pool.map(count_local_tar, [local_path(u) for u in urls], [keys] * len(urls),
                              chunksize=8):
                out.append(c)
                prog.step(c)
            return out
    if workers <= 1 or len(urls) == 1:
        out = []
        for u in urls:
            out.append(_count_any(u, keys))
            prog.step(out[-1])
        return out
    with ThreadPoolExecutor(max_workers=workers) as pool:  # seeks and reads release the GIL
        out = []
        for c in pool.map(lambda u: _count_any(u, keys), urls):
            out.append(c)
            prog.step(c)
        return out


# -- writing our manifest for foreign shards --------------------------------------------------------


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    with open(local_path(url), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest_for(urls: Sequence[str], counts: Sequence[TarCount], folder: Path,
                 keys: SampleKeys = DEFAULT_KEYS, checksums: bool = False) -> dict:
    """Our manifest (``shards.read_manifest`` reads it) for ``urls`` as counted."""
    entries = []
    for u, c in zip(urls, counts):
        local = not is_remote(u)
        p = Path(local_path(u))
        e: dict = {"name": p.name if local else u.rsplit("/", 1)[-1], "samples": c.samples}
        if not (local and p.parent.resolve() == folder.resolve()):
            e["url"] = u
        if local:
            e["bytes"] = c.size
            if checksums:
                e["sha256"] = _sha256(u)
        if c.images != c.samples:
            e["without_image"] = c.samples - c.images
        entries.append(e)
    return {"format": "mae-scale-shards/1", "source": "index", "prefix": "", "shards": entries,
            "total": sum(c.samples for c in counts), "num_classes": 0, "classes": None,
            "image_key": keys.image_key}


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def cache_dir() -> Path:
    """Where header counts are cached: ``$MAE_SCALE_INDEX_CACHE``, else ``~/.cache/mae-scale/index``."""
    env = os.environ.get("MAE_SCALE_INDEX_CACHE")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(env) if env else Path(base) / "mae-scale" / "index"


def _cache_file(folder: Path) -> Path:
    return cache_dir() / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24] + ".json")


def _stamp(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def cached_counts(urls: Sequence[str]) -> list[int] | None:
    """Counts of local tars from an earlier header count, if every tar's size and mtime still
    match (a rewritten tar is counted again)."""
    paths = [Path(local_path(u)) for u in urls]
    if not paths or any(is_remote(u) for u in urls) or len({p.parent for p in paths}) != 1:
        return None
    m = _load_json(_cache_file(paths[0].parent))
    if not isinstance(m, dict):
        return None
    by_name = {s.get("name"): s for s in m.get("shards", []) if isinstance(s, dict)}
    out = []
    for p in paths:
        s = by_name.get(p.name)
        try:
            if s is None or [s.get("bytes"), s.get("mtime_ns")] != list(_stamp(p)):
                return None
        except OSError:
            return None
        out.append(int(s["samples"]))
    return out


def count_and_cache(urls: Sequence[str], keys: SampleKeys = DEFAULT_KEYS,
                    workers: int | None = None) -> list[TarCount]:
    """Header-count local tars and remember the counts (with each tar's size and mtime) in the
    user's cache, never in the shards' folder: a data set is often read-only or shared, and
    reading shards must not change what sits beside them. ``data index`` writes a manifest there
    on request."""
    counts = scan_counts(urls, keys, workers)
    paths = [Path(local_path(u)) for u in urls]
    if paths and len({p.parent for p in paths}) == 1 and not any(c.problem for c in counts):
        path = _cache_file(paths[0].parent)
        old = _load_json(path)
        entries = {s["name"]: s for s in (old or {}).get("shards", []) if isinstance(s, dict) and "name" in s}
        try:
            for p, c in zip(paths, counts):
                size, mtime = _stamp(p)
                entries[p.name] = {"name": p.name, "samples": c.samples, "bytes": size, "mtime_ns": mtime}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"folder": str(paths[0].parent.resolve()), "shards": list(entries.values())})
        except OSError:
            pass  # no cache: the count is simply made again next time
    return counts


def index_shards(urls: Sequence[str], out: Path, keys: SampleKeys = DEFAULT_KEYS, workers: int | None = None,
                 checksums: bool = False, progress: bool = True) -> dict:
    """``mae-scale data index``: count ``urls`` (headers where the transport allows), write our
    manifest to ``out`` and return it."""
    counts = scan_counts(urls, keys, workers, progress)
    manifest = manifest_for(urls, counts, out.parent, keys, checksums)
    manifest["read"] = {"bytes": sum(c.bytes_read for c in counts),
                        "streamed": sum(c.how == "stream" for c in counts),
                        "problems": {u: c.problem for u, c in zip(urls, counts) if c.problem}}
    write_json(out, manifest)
    return manifest


def expand_spec(spec: str) -> list[str]:
    """The shard URLs a ``data index`` argument names: a folder's tars, a brace pattern, one URL."""
    p = Path(spec)
    if "{" not in spec and not is_remote(spec) and p.is_dir():
        tars = sorted(str(t) for t in p.iterdir() if t.name.endswith((".tar", ".tar.gz", ".tgz"))
                      and not t.name.startswith("."))
        if not tars:
            raise DataInputError(f"{spec} holds no .tar files")
        return tars
    urls = list(braceexpand(spec))
    if not urls:
        raise DataInputError(f"{spec} names no shard")
    return urls
