"""Which shards a run reads and how many samples each holds (:class:`ShardSet`).

From a manifest or a foreign index (timm's ``_info.json``, a wids index, img2dataset's
``_stats.json``: ``index.py``) the counts are known without opening a shard; local tars without
one are counted from their headers alone (``tarscan.py``), and a shard that cannot be read then
counts what it could give, with a warning, instead of stopping the run (``shard_read.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from .errors import DataInputError
from .index import cached_counts, count_and_cache, index_counts, is_remote, json_index, remote_refusal
from .shard_read import warn_shard_once
from .shards import MANIFEST_NAME, read_manifest

__all__ = ["ShardSet", "resolve_shards"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs and their sample counts, in the manifest's (canonical) order."""

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # None: unknown (remote shards without an index, resampled)

    @property
    def total(self) -> int:
        if self.counts is None:
            raise ValueError("the sample counts of these shards are unknown (no index)")
        return sum(self.counts)


def _from_manifest(path: Path) -> ShardSet:
    m = read_manifest(path)
    d = path if path.is_dir() else path.parent
    # an entry's url: a remote shard or one outside the folder (written by `data index`)
    return ShardSet(tuple(s.get("url") or str(d / s["name"]) for s in m["shards"]),
                    tuple(int(s["samples"]) for s in m["shards"]))


def _count(urls: list[str], workers: int | None = None) -> tuple[int, ...]:
    """Samples of each shard from its tar headers (``tarscan.py``; a damaged or compressed tar by
    reading it). A shard that cannot be read counts 0 (and one that breaks part-way, the samples
    before the break) with a warning, rather than stopping a run over one bad file; only when no
    shard gives a single sample is that an error."""
    counts, problems = [], []
    from .shard_read import ShardProblem

    for url, c in zip(urls, count_and_cache(urls, workers=workers)):
        counts.append(c.samples)
        if c.problem is not None:
            kind, _, reason = c.problem.partition(": ")
            problem = ShardProblem(url, kind, reason, c.samples)
            problems.append(problem)
            warn_shard_once(problem, f"; counted as {c.samples} samples, no manifest to say more")
    if problems and not any(counts):
        p = problems[0]
        raise DataInputError(f"none of the {len(urls)} shard(s) could be read ({p.url}: {p.kind}, "
                             f"{p.reason}); check the paths or the shards")
    return tuple(counts)


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _from_folder(d: Path) -> ShardSet:
    """A folder: our manifest, else timm's ``_info.json`` (one split), else its tars."""
    if (d / MANIFEST_NAME).is_file():
        return _from_manifest(d)
    if (d / "_info.json").is_file():
        try:
            return ShardSet(*map(tuple, json_index(str(d / "_info.json"))))
        except DataInputError as e:
            if "name one" in str(e):
                raise
    tars = sorted(str(p) for p in d.iterdir() if p.name.endswith(_TAR_SUFFIXES) and not p.name.startswith("."))
    if not tars:
        return _from_manifest(d)  # the usual "no shard manifest at ..." error
    return _from_urls(tars)


def _from_urls(urls: list[str], resampled: bool = False, workers: int | None = None,
               read_remote: bool = True) -> ShardSet:
    found = index_counts(urls) or (cached_counts(urls), "cache")
    if found[0] is not None:
        return ShardSet(tuple(urls), tuple(found[0]))
    remote = [u for u in urls if is_remote(u)]
    if remote:
        if resampled:
            return ShardSet(tuple(urls), None)
        if not read_remote:
            raise remote_refusal(len(remote))
        log.warning("counting %d remote shard(s) by reading each once in full (no index gives their "
                    "counts; `mae-scale data index SHARDS --out manifest.json` writes one)", len(remote))
    return ShardSet(tuple(urls), _count(urls, workers))


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                   resampled: bool = False, workers: int | None = None,
                   read_remote: bool = True) -> ShardSet:
    """Accept a manifest path, a shard folder, a JSON index (a wids index, timm's ``_info.json``,
    ``_info.json#SPLIT``), a brace pattern (``dir/train-{000000..000003}.tar``) or a list of tar
    paths/URLs (``pipe:`` works).

    Sample counts come from an index without reading a tar, else from the local tars' headers
    (``index.py``). Remote shards without an index: with ``resampled`` the counts are None (the
    resampled stream reads whole shards and needs none); else they are read once in full to count
    them, with a warning, or, with ``read_remote=False``, refused in one line (the trainers' config
    check refuses them so, before any work).
    """
    if isinstance(shards, (str, os.PathLike)):
        s = os.fspath(shards)
        p = Path(s)
        if "{" not in s and not is_remote(s):
            if p.is_dir():
                return _from_folder(p)
            base = s.partition("#")[0]
            if base.endswith(".json"):
                if Path(base).name == MANIFEST_NAME or _is_ours(Path(base)):
                    return _from_manifest(Path(base))
                return ShardSet(*map(tuple, json_index(s)))
        urls = list(braceexpand(s))
    else:
        urls = [os.fspath(u) for u in shards]
    if not urls:
        raise ValueError("empty shard list")
    return _from_urls(urls, resampled, workers, read_remote)


def _is_ours(p: Path) -> bool:
    try:
        return '"mae-scale-shards/' in p.read_text(encoding="utf-8")[:4096]
    except (OSError, ValueError):
        return True  # read_manifest says what is wrong with it
