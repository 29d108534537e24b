"""A weighted mix of shard sets as one epoch stream (``data.train_shards`` as a list of sources).

The mixed epoch keeps the single-source contract of ``stream.py``: a pure function of (seed, epoch,
position), equal length on every rank, exact mid-epoch resume without decoding what is skipped.

1. Length. An epoch is ``epoch_samples`` positions if given, else the sum of the sources' sizes.
2. Which source. Source s gets a quota of ``epoch_samples * w_s / sum(w)`` positions (largest
   remainder rounding, so the quotas add up), and the epoch's source sequence is that multiset
   permuted by a generator seeded by (seed, epoch): a per-position draw *without replacement*, so
   every epoch gives each source exactly its share (not just on average). With weights equal to
   the sources' sizes and the default length, every sample of every source is seen exactly once.
3. Which sample. The k-th position given to source s reads sample k of that source's own stream:
   its shards permuted by (seed, epoch, source, cycle) and concatenated, cycle after cycle. A
   source drawn more often than its size (a small set with a large weight) thus repeats within an
   epoch, but only after each of its samples has come once in that cycle; one drawn less often
   sees a different part of itself each epoch.
4. Everything after that is ``stream.py``'s: ranks and workers take contiguous ranges of the mixed
   positions, shuffle them in a bounded buffer, crop by (seed, epoch, position), refill bad
   samples inside the batch. A worker reads, per source, one contiguous run of that source's
   stream (sequential reads, as with one source). Each batch says how many of its samples came
   from each source (``ShardLoader.source_counts``; the trainer logs the shares).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataInputError
from .shard_read import read_shard
from .shardset import ShardSet, resolve_shards

__all__ = ["Source", "Mix", "resolve_mix", "is_mix_spec"]

_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Source:
    name: str
    shards: ShardSet
    weight: float


@dataclass(frozen=True)
class Mix:
    sources: tuple[Source, ...]
    epoch_samples: int

    def quotas(self) -> list[int]:
        """Positions per epoch of each source: proportional to weight, adding up exactly."""
        total_w = sum(s.weight for s in self.sources)
        exact = [self.epoch_samples * s.weight / total_w for s in self.sources]
        q = [math.floor(x) for x in exact]
        by_rest = sorted(range(len(q)), key=lambda i: (-(exact[i] - q[i]), i))
        for i in by_rest[: self.epoch_samples - sum(q)]:
            q[i] += 1
        return q


def is_mix_spec(shards) -> bool:
    return isinstance(shards, (list, tuple)) and bool(shards) and all(isinstance(s, dict) for s in shards)


def _name(spec, used: set[str]) -> str:
    if isinstance(spec, (list, tuple)):  # a list of tars: name it after their folder
        spec = os.path.dirname(str(spec[0])) if spec else "source"
    base = os.path.basename(os.path.normpath(str(spec).partition("#")[0])) or "source"
    base = re.sub(r"[^A-Za-z0-9_]+", "_", base.split("{")[0].removesuffix(".json")).strip("_") or "source"
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    return name


def resolve_mix(sources: Sequence[dict], epoch_samples: int | None = None) -> Mix:
    """``[{"shards": SPEC, "weight": W, "name": optional}, ...]`` -> a :class:`Mix`; one-line
    errors for a weight that is not positive and finite, an empty source, a clashing name."""
    out: list[Source] = []
    used: set[str] = set()
    for i, src in enumerate(sources):
        unknown = set(src) - {"shards", "weight", "name"}
        if unknown or "shards" not in src:
            raise DataInputError(f"source {i} must be {{shards: ..., weight: ...}} (name optional), "
                                 f"got keys {sorted(src)}")
        w = src.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise DataInputError(f"source {i} ({src['shards']}): weight {w!r} must be a positive finite number")
        name = src.get("name") or _name(src["shards"], used)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name) or name in used:
            raise DataInputError(f"source {i}: name {name!r} must be unique letters, digits or '_'")
        used.add(name)
        ss = src["shards"] if isinstance(src["shards"], ShardSet) else resolve_shards(src["shards"])
        if ss.counts is None or ss.total == 0:
            raise DataInputError(f"source {name} ({src['shards']}) holds no samples")
        out.append(Source(name, ss, float(w)))
    if not out:
        raise DataInputError("a mix needs at least one source")
    n = sum(s.shards.total for s in out) if epoch_samples is None else epoch_samples
    return Mix(tuple(out), n)


class MixedEpoch:
    """The source sequence of one epoch and, for each position, its index in that source's
    stream; computed once per process per epoch (numpy, ~20 ms per million positions)."""

    def __init__(self, mix: Mix, seed: int, epoch: int) -> None:
        self.mix, self.seed, self.epoch = mix, seed, epoch
        q = mix.quotas()
        src = np.repeat(np.arange(len(q), dtype=np.int16), q)
        self.src = np.random.default_rng([seed & _M64, epoch, 0x313C]).permutation(src)
        self.local = np.empty(len(src), dtype=np.int64)
        for s in range(len(q)):
            where = self.src == s
            self.local[where] = np.arange(int(where.sum()))

    def source_layout(self, s: int, cycle: int) -> tuple[list[int], list[int]]:
        """(shard order, first index of each) of source ``s``'s stream in ``cycle``."""
        counts = self.mix.sources[s].shards.counts
        perm = np.random.default_rng([self.seed & _M64, self.epoch, s, cycle, 0x5C1E]).permutation(len(counts))
        order = perm.tolist()
        starts = np.concatenate([[0], np.cumsum([counts[i] for i in order])[:-1]]).astype(int).tolist()
        return order, starts

    def read_source(self, s: int, needed: set[int], lo: int, hi: int,
                    on_problem) -> Iterator[tuple[int, str, dict | None]]:
        """Samples ``lo..hi`` of source ``s``'s stream in order; data only for ``needed``."""
        ss = self.mix.sources[s].shards
        n = ss.total
        for cycle in range(lo // n, hi // n + 1):
            order, starts = self.source_layout(s, cycle)
            for t, shard in enumerate(order):
                s0, c = cycle * n + starts[t], ss.counts[shard]
                if s0 + c <= lo or s0 > hi:
                    continue
                for i, key, members in read_shard(ss.urls[shard], want=lambda i, s0=s0: s0 + i in needed,
                                                  stop=min(c, hi - s0 + 1), on_problem=on_problem):
                    yield s0 + i, key, members


class MixFetcher:
    """``_Fetcher``'s interface over the mixed positions: one forward reader per source."""

    def __init__(self, epoch: MixedEpoch, needed: Sequence[int], on_problem, fetcher_cls) -> None:
        self.src, self.local = epoch.src, epoch.local
        by_source: dict[int, list[int]] = {}
        for p in needed:
            by_source.setdefault(int(self.src[p]), []).append(int(self.local[p]))
        self.fetchers = {
            s: fetcher_cls(epoch.read_source(s, set(ks), min(ks), max(ks), on_problem))
            for s, ks in by_source.items()
        }

    def get(self, pos: int, keep: bool = False):
        return self.fetchers[int(self.src[pos])].get(int(self.local[pos]), keep)

    def sources(self, positions: Sequence[int], names: Sequence[str]) -> dict[str, int]:
        return dict(Counter(names[int(self.src[p])] for p in positions))
