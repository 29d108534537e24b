"""The validation stream: every sample of a shard set exactly once over all ranks, in order.

Evaluation needs the opposite of training's epoch stream (``stream.py``): no shuffle, no dropped
remainder, no refill of bad samples, and ranks may end with different batch counts. The rules:

1. Positions. The shards in their canonical (manifest) order, concatenated, number the samples
   0..N-1.
2. Ranks. Rank r gets the contiguous range ``[r*N//R + min(r, N%R), ...)`` of ``N//R`` or
   ``N//R + 1`` samples (10 over 3 ranks: 4/3/3); nothing is dropped.
3. Workers. The rank's range is cut into batches of ``batch_size`` (only the last may be short),
   and worker w gets a contiguous run of those batches, so each worker opens only the shards its
   run touches and reads every sample once (earlier members of its first shard are passed over
   without reading their data).
4. Batches. A worker fills batches with the good samples of its run, in order. Bad samples
   (undecodable, empty, too large, no image member, non-integer ``.cls``, an unsafe tar member,
   a shard shorter than its manifest says, and every sample of a missing, unreadable or
   truncated shard: ``shard_read.py``) are skipped and counted by kind in ``loader.bad_counts``;
   a batch after a bad sample may be short. A damaged shard is logged once, with its path. DataLoader takes the workers' batches round robin, so the batch
   order is deterministic (positional within each worker).

Because ranks may yield different numbers of batches, gather metrics after the loop (sum of
correct / count over ranks), not per batch.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import BadImage
from .loader_guard import guard_workers, ignore_stop_signals
from .shard_read import SHARD_KINDS, ShardProblem, image_and_label, read_shard, warn_shard_once
from .keys import DEFAULT_KEYS, SampleKeys, parse_keys
from .shardset import ShardSet, resolve_shards

__all__ = ["make_eval_loader", "EvalLoader", "split_range"]

log = logging.getLogger(__name__)

Transform = Callable[[bytes, torch.Generator], torch.Tensor]
_MAX_LOGGED = 5  # bad-sample warnings per worker


def split_range(n: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of ``part`` when 0..n-1 is cut into ``parts`` contiguous, near-equal pieces
    (the first ``n % parts`` pieces one longer)."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


class EvalStream(IterableDataset):
    """One rank's samples; each (DataLoader) worker yields the batches of its own run."""

    def __init__(self, shardset: ShardSet, *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, transform: Transform, keys: SampleKeys = DEFAULT_KEYS,
                 limit: int | None = None, offset: int = 0) -> None:
        self.ss, self.batch_size, self.transform = shardset, batch_size, transform
        self.keys = keys
        self.W = max(num_workers, 1)
        left = max(shardset.total - offset, 0)
        total = left if limit is None else min(limit, left)
        lo, hi = split_range(total, world_size, rank)
        self.lo, self.hi = offset + lo, offset + hi
        self.starts = [0]
        for c in shardset.counts:
            self.starts.append(self.starts[-1] + c)

    @property
    def num_batches(self) -> int:
        """Batches of this rank when no sample is bad: ceil(samples / batch_size)."""
        return -(-(self.hi - self.lo) // self.batch_size)

    def worker_range(self, worker: int) -> tuple[int, int]:
        """[start, stop) global positions of ``worker``: a contiguous run of whole batches."""
        b0, b1 = split_range(self.num_batches, self.W, worker)
        return self.lo + b0 * self.batch_size, min(self.lo + b1 * self.batch_size, self.hi)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        yield from self._worker(info.id if info is not None else 0)

    def _read(self, lo: int, hi: int,
              problems: list[ShardProblem]) -> Iterator[tuple[str | None, object]]:
        """(key, members) for positions lo..hi-1 in order; (None, BadImage) for positions a
        shard could not give (damaged, or shorter than its manifest says: shard_read.py)."""
        for shard, url in enumerate(self.ss.urls):
            s, e = self.starts[shard], self.starts[shard + 1]
            if e <= lo or s >= hi:
                continue
            first, stop = max(lo - s, 0), min(hi, e) - s
            for i, key, members in read_shard(url, want=lambda i: i >= first, stop=stop,
                                              on_problem=problems.append):
                if i >= first:
                    yield key, members

    def _decode(self, key: str | None, members: dict | None) -> tuple[int, torch.Tensor]:
        data, label = image_and_label(members, self.keys)
        try:
            return label, self.transform(data, None)
        except BadImage:
            raise
        except (RuntimeError, ValueError, OSError) as e:
            raise BadImage("undecodable", f"{type(e).__name__}: {e}") from None

    def _worker(self, worker: int) -> Iterator[dict]:
        lo, hi = self.worker_range(worker)
        keys: list[str] = []
        labels: list[int] = []
        images: list[torch.Tensor] = []
        bad: Counter[str] = Counter()
        problems: list[ShardProblem] = []  # handed to the main process, which logs each once
        logged = 0
        for pos, (key, members) in enumerate(self._read(lo, hi, problems), lo):
            try:
                label, img = self._decode(key, members)
            except BadImage as e:
                bad[e.kind] += 1
                if logged < _MAX_LOGGED and e.kind not in SHARD_KINDS:
                    logged += 1
                    log.warning("skipping bad eval sample %s (%s): %s",
                                key or f"<position {pos}>", e.kind, e.reason)
                continue
            keys.append(key)
            labels.append(label)
            images.append(img)
            if len(keys) == self.batch_size:
                yield _batch(keys, labels, images, bad, problems)
                keys, labels, images, bad, problems[:] = [], [], [], Counter(), []
        if keys or bad or problems:
            yield _batch(keys, labels, images, bad, problems)  # image-less: only counts


def _batch(keys: list[str], labels: list[int], images: list[torch.Tensor], bad: Counter,
           problems: list[ShardProblem]) -> dict:
    return {"image": torch.stack(images) if images else None, "key": keys,
            "label": torch.tensor(labels, dtype=torch.int64), "bad": dict(bad),
            "shards": list(problems)}


class EvalLoader:
    """Iterable of ``{"image": uint8 [B,3,S,S], "label": int64 [B], "key": list[str]}``.

    ``num_samples``: samples assigned to this rank (bad ones included); ``len()``: its batches
    when none is bad (an upper bound); ``bad_counts``: bad samples by kind seen by the current
    or last iteration.
    """

    def __init__(self, stream: EvalStream, num_workers: int, pin_memory: bool) -> None:
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.bad_counts: Counter[str] = Counter()
        self.bad_shards: dict[str, str] = {}  # url -> kind of each damaged shard met

    @property
    def num_samples(self) -> int:
        return self.stream.hi - self.stream.lo

    def __len__(self) -> int:
        return self.stream.num_batches

    def __iter__(self) -> Iterator[dict]:
        self.bad_counts = Counter()
        self.bad_shards = {}
        if self.num_workers == 0:
            batches: Iterator[dict] = iter(self.stream)
        else:
            batches = guard_workers(DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers,
                pin_memory=self.pin_memory, persistent_workers=False, worker_init_fn=ignore_stop_signals),
                self.num_workers)
        try:
            for batch in batches:
                for problem in batch.pop("shards", ()):
                    self.bad_shards[problem.url] = problem.kind
                    warn_shard_once(problem)
                self.bad_counts.update(batch.pop("bad"))
                if batch["key"]:
                    yield batch
        finally:  # stop the workers now, not when a kept traceback lets go of this frame
            close = getattr(batches, "close", None)
            if close is not None:
                close()


def make_eval_loader(
    shards: str | os.PathLike | Sequence[str | os.PathLike] | ShardSet,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    transform: Transform,
    pin_memory: bool = False,
    image_key: str | None = None,
    label_key: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> EvalLoader:
    """This rank's share of every sample of ``shards``, exactly once over all ranks, unshuffled
    (see the module docstring). ``transform``: ``(bytes, generator) -> uint8 [3, S, S]``, called
    with ``generator=None`` (e.g. ``EvalTransform``); it must be picklable when
    ``num_workers > 0``. Unlabelled samples (no ``label_key`` member or field, or a negative one:
    ``keys.py``) get label -1; ``image_key`` / ``label_key`` as in ``make_loader``. ``limit``: only
    the first ``limit`` positions (a fixed subset, split over the ranks like the whole set);
    ``offset``: start at that position (two disjoint subsets of one set: offset = the first's limit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if not callable(transform):
        raise ValueError(f"transform must be a callable (bytes, generator) -> uint8 [3, S, S], "
                         f"got {transform!r}")
    keys = parse_keys(image_key, label_key)
    ss = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
    stream = EvalStream(ss, batch_size=batch_size, rank=rank, world_size=world_size,
                        num_workers=num_workers, transform=transform, keys=keys, limit=limit, offset=offset)
    return EvalLoader(stream, num_workers, pin_memory)
