"""Which shards a run reads and how many samples each holds (:class:`ShardSet`).

From a manifest the counts are known without opening a shard; shards given without one (a
brace pattern, a list of paths or URLs, ``pipe:`` commands) are counted by reading each once,
and a shard that cannot be read then counts what it could give, with a warning, instead of
stopping the run (``shard_read.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from .errors import DataInputError
from .shard_read import count_shard, warn_shard_once
from .shards import MANIFEST_NAME, read_manifest

__all__ = ["ShardSet", "resolve_shards"]


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs and their sample counts, in the manifest's (canonical) order."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _from_manifest(path: Path) -> ShardSet:
    m = read_manifest(path)
    d = path if path.is_dir() else path.parent
    return ShardSet(tuple(str(d / s["name"]) for s in m["shards"]),
                    tuple(int(s["samples"]) for s in m["shards"]))


def _count(urls: list[str]) -> tuple[int, ...]:
    """Samples of each shard, by reading it. A shard that cannot be read counts 0 (and one that
    breaks part-way, the samples before the break) with a warning, rather than stopping a run
    over one bad file; only when no shard gives a single sample is that an error."""
    counts, problems = [], []
    for url in urls:
        n, problem = count_shard(url)
        counts.append(n)
        if problem is not None:
            problems.append(problem)
            warn_shard_once(problem, f"; counted as {n} samples, no manifest to say more")
    if problems and not any(counts):
        p = problems[0]
        raise DataInputError(f"none of the {len(urls)} shard(s) could be read ({p.url}: {p.kind}, "
                             f"{p.reason}); check the paths or the shards")
    return tuple(counts)


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSet:
    """Accept a manifest path, a shard dir with ``manifest.json``, a brace pattern
    (``dir/train-{000000..000003}.tar``) or a list of tar paths/URLs (``pipe:`` works).

    Without a manifest the samples are counted by reading every tar once, unless all tars sit in
    one local directory whose manifest lists them (a tar that cannot be read counts the samples
    before the damage, 0 if none, with a warning: see ``_count``).
    """
    if isinstance(shards, (str, os.PathLike)):
        s = os.fspath(shards)
        p = Path(s)
        if "{" not in s and not s.startswith("pipe:"):
            if p.is_dir():
                return _from_manifest(p)
            if p.suffix == ".json":
                return _from_manifest(p)
        urls = list(braceexpand(s))
    else:
        urls = [os.fspath(u) for u in shards]
    if not urls:
        raise ValueError("empty shard list")
    local = [Path(u) for u in urls if "://" not in u and not u.startswith("pipe:")]
    if len(local) == len(urls) and len({p.parent for p in local}) == 1:
        mpath = local[0].parent / MANIFEST_NAME
        if mpath.exists():
            counts = {s["name"]: int(s["samples"]) for s in read_manifest(mpath)["shards"]}
            if all(p.name in counts for p in local):
                return ShardSet(tuple(urls), tuple(counts[p.name] for p in local))
    return ShardSet(tuple(urls), _count(urls))
