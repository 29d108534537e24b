"""Stream augmented batches from tar shards: rank/worker split, (seed, epoch) shuffle, exact resume.

The whole epoch is a pure function of (shards, seed, epoch, world_size, num_workers, batch_size),
which is what makes exact resume and equal per-rank lengths possible:

1. Epoch stream. The shard order is permuted by (seed, epoch); concatenating the shards in that
   order gives a stream of N samples, each with a *global position* 0..N-1.
2. Ranges. The stream is cut into R = world_size * W contiguous ranges (W = max(num_workers, 1))
   of ``per = (N // R) // batch_size * batch_size`` samples; the last ``N - R * per`` samples
   (fewer than R * batch_size) are dropped this epoch (a different tail every epoch,
   because the shard order changes). Range ``r = rank * W + worker``. A worker opens only the
   shards its range touches and passes over earlier members of the first one without reading
   their data.
3. Order. Within its range a worker shuffles with a bounded buffer (``shuffle_buffer``) seeded by
   (seed, epoch, rank, worker, world_size). The shuffle runs on positions, not on data, so the
   worker knows its whole output order up front and can drop a prefix of it without decoding.
4. Augmentation randomness for the sample at position p is a generator seeded by
   (seed, epoch, p): skipping never changes later samples' crops (nor does the world size).
5. Batches. Each worker yields ``per // batch_size`` whole batches; DataLoader takes them round
   robin (worker 0, 1, ..., W-1, 0, ...), so the rank's batch order is deterministic and
   ``len(loader) = W * (per // batch_size)``, the same on every rank.

Resume: ``skip_samples`` = samples this rank already consumed this epoch (batches * batch_size).
Rank-local batch b came from worker ``b % W``; each worker drops its share of the first
``skip_samples / batch_size`` batches, and DataLoader worker ids are rotated so that round robin
starts at the worker that owns the next batch. ``len(loader)`` stays the full epoch length on
purpose (the schedule and epoch bookkeeping are in full epochs); ``loader.remaining`` is what this
iteration will yield.

Bad samples (zero-byte, undecodable, too many pixels, no image member, non-integer ``.cls``, an
unsafe tar member, a shard shorter than its manifest says, and every sample a missing, unreadable
or truncated shard should have given: ``shard_read.py``) are counted by kind in
``loader.bad_counts``; the first few are logged, a damaged shard once, with its path. Their
slots are refilled *inside the same batch* by another augmentation (fresh crop) of a good sample
from that batch (or, if the whole batch is bad, of the next good sample later in the worker's
order). Refilling within the batch rather than pulling the next sample keeps every batch a
function of its own positions only, so resume stays exact without decoding the skipped part, and
every rank keeps the same length. A worker whose bad share exceeds
``max_bad_fraction`` raises :class:`TooManyBadSamples` (with its counts by kind, in this process
also when raised in a worker). A worker killed from outside: :class:`LoaderWorkerDied` (``loader_guard.py``).

A weighted mix of sources (``shards`` as a list of ``{shards, weight}``) is one such epoch over
positions drawn from the sources (``mix.py``); everything below holds for it unchanged.

Resampled mode (``resampled=True``): an infinite-style stream cut into epochs of
``epoch_samples`` samples over all ranks (default: the data set's size), drawn *with
replacement*, as webdataset's ``ResampledShards`` does, but still a pure function of the
arguments:

- Each rank/worker gets its own stream: shards drawn at random (probability proportional to
  their sample count, so every sample is equally likely), each read whole and in order, from a
  generator seeded by (seed, epoch, rank, worker), until ``per`` samples are covered (the last
  draw is cut short). Sequential shard reads keep I/O as cheap as in the default mode. Samples
  (and whole shards) repeat within and across workers/ranks; ranks draw different streams.
- ``per = (epoch_samples // (world_size * W)) // batch_size * batch_size`` positions per
  worker, shuffled by the same bounded buffer as above, so ``len(loader) = W * (per //
  batch_size)``, i.e. ``epoch_samples // (world_size * batch_size)`` rounded down to a multiple
  of W, the same on every rank.
- Augmentation seeds are (seed, epoch, position, rank, worker): a sample drawn twice gets two
  crops. Crops therefore depend on the split in this mode (nothing else can: which samples a
  rank sees depends on it).
- Batches, round robin, ``skip_samples`` and bad-sample refill work exactly as above.

Batched decode (``decode_device`` other than ``"cpu"``): workers draw the crops but leave the
decoding to this process, a batch at once (``loader.py`` says how).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .augment import BadImage, MAEAugment, raw_jpeg as _raw_jpeg
from .errors import TooManyBadSamples
from .keys import DEFAULT_KEYS, SampleKeys, parse_keys
from .loader import ShardLoader, _decode_device  # the main-process side of the stream
from .mix import Mix, MixedEpoch, MixFetcher, is_mix_spec, resolve_mix
from .shard_read import SHARD_KINDS, ShardProblem, image_and_label, read_shard
from .shardset import ShardSet, resolve_shards

__all__ = ["make_loader", "ShardLoader", "ShardSet", "resolve_shards", "TooManyBadSamples", "image_and_label"]

log = logging.getLogger(__name__)

Augment = Callable[[bytes, torch.Generator], torch.Tensor]
_M64 = (1 << 64) - 1
_MAX_LOGGED = 5  # bad-sample warnings per worker per epoch
_MIN_JUDGED = 200  # samples a worker sees before its bad share is judged (or its whole range)


def _mix(*values: int) -> int:
    """A 64-bit seed from integers (splitmix64 steps): cheap enough to call once per sample."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _M64
        h ^= h >> 31
    return h


def _bounded_shuffle(start: int, n: int, bufsize: int, rng: np.random.Generator) -> list[int]:
    """Positions start..start+n-1 in the order a size-``bufsize`` shuffle buffer emits them."""
    if n <= bufsize:
        return (start + rng.permutation(n)).tolist()
    buf = list(range(start, start + bufsize))
    out: list[int] = []
    nxt = start + bufsize
    for j in rng.integers(0, bufsize, size=n - bufsize).tolist():
        out.append(buf[j])
        buf[j] = nxt
        nxt += 1
    out.extend(buf[i] for i in rng.permutation(bufsize).tolist())
    return out


class _Fetcher:
    """Random access to upcoming positions of a forward-only sample stream, holding what was
    read ahead until it is asked for (memory stays ~ the shuffle buffer)."""

    def __init__(self, samples: Iterator[tuple[int, str, dict[str, bytes] | None]]) -> None:
        self.samples = samples
        self.held: dict[int, tuple[str, dict[str, bytes]]] = {}
        self.last = -1
        self.done = False

    def get(self, pos: int, keep: bool = False) -> tuple[str, dict[str, bytes]] | None:
        while pos not in self.held and self.last < pos and not self.done:
            try:
                q, key, members = next(self.samples)
            except StopIteration:
                self.done = True
                break
            self.last = q
            if members is not None:
                self.held[q] = (key, members)
        return self.held.get(pos) if keep else self.held.pop(pos, None)


class ShardStream(IterableDataset):
    """One rank's epoch; each (DataLoader) worker yields the batches of its own range."""

    def __init__(self, shardset: ShardSet, *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, epoch: int, seed: int, skip_batches: int, augment: Augment,
                 max_bad_fraction: float, shuffle_buffer: int, resampled: bool = False,
                 epoch_samples: int | None = None, raw_jpeg: bool = False,
                 keys: SampleKeys = DEFAULT_KEYS, mix: Mix | None = None) -> None:
        self.ss = shardset if mix is None else mix.sources[0].shards
        self.keys, self.mix = keys, mix
        self._mixed: MixedEpoch | None = None  # the epoch's source sequence, made on first use
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.W = max(num_workers, 1)
        self.epoch, self.seed, self.skip_batches = epoch, seed, skip_batches
        self.augment, self.max_bad_fraction = augment, max_bad_fraction
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.raw_jpeg = raw_jpeg  # batched decode: JPEGs leave the worker undecoded (_RawJPEG)
        if mix is not None:
            self.epoch_samples = mix.epoch_samples
        elif self.ss.counts is None:  # remote shards without an index: resampled only
            if not resampled or epoch_samples is None:
                raise ValueError("shards without sample counts (no index) need resampled=True and "
                                 "epoch_samples")
            self.epoch_samples = epoch_samples
        else:
            self.epoch_samples = self.ss.total if epoch_samples is None else epoch_samples
        n = self.epoch_samples if resampled or mix is not None else self.ss.total
        self.per = (n // (world_size * self.W)) // batch_size * batch_size
        self._aug_key: tuple[int, ...] = ()  # resampled: (rank, worker), set per worker
        self._layouts: dict[int, tuple[list[int], list[int]]] = {}
        self._problems: list[ShardProblem] = []  # damaged shards met, not yet handed on
        # shard order and each shard's first global position in this epoch's stream
        perm = np.random.default_rng([seed & _M64, epoch, 0x5EED]).permutation(len(self.ss.urls))
        self.order = perm.tolist()
        counts = [self.ss.counts[i] if self.ss.counts else 0 for i in self.order]
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()

    @property
    def batches_per_worker(self) -> int:
        return self.per // self.batch_size

    def worker_skip(self, worker: int) -> int:
        """Batches of ``worker`` among the first ``skip_batches`` (round robin from worker 0)."""
        return self.skip_batches // self.W + (worker < self.skip_batches % self.W)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        self._problems = []
        try:
            # rotate ids so DataLoader's round robin (always from id 0) starts at the worker
            # that owns batch number skip_batches
            yield from self._worker((wid + self.skip_batches) % self.W)
        except TooManyBadSamples as e:
            # handed on as data: DataLoader would re-raise it in the main process with a
            # message whose first line has lost the counts ("Caught TooManyBadSamples in ...")
            yield {"error": str(e), "shards": self._take_problems()}

    def _take_problems(self) -> list[ShardProblem]:
        out, self._problems = self._problems, []
        return out

    def layout(self, worker: int) -> tuple[list[int], list[int]]:
        """(shard indices, first position of each) of the stream ``worker``'s positions index:
        the epoch's permuted shard order, or (resampled) the worker's own random shard draws."""
        if not self.resampled:
            return self.order, self.starts
        if worker not in self._layouts:
            rng = np.random.default_rng([self.seed & _M64, self.epoch, self.rank, worker, 0x2E5A])
            p = np.asarray(self.ss.counts, dtype=float) / self.ss.total
            order: list[int] = []
            starts: list[int] = []
            n = 0
            while n < self.per:
                # shards drawn with probability ~ their sample count: every sample equally likely
                for shard in rng.choice(len(p), size=64, p=p).tolist():
                    if n >= self.per:
                        break
                    order.append(shard)
                    starts.append(n)
                    n += self.ss.counts[shard]
            self._layouts[worker] = (order, starts)
        return self._layouts[worker]

    def positions(self, worker: int) -> list[int]:
        """Positions (in ``layout(worker)``'s stream) in the order this worker consumes them
        (before any skip): a range of the global stream, or (resampled) 0..per-1."""
        r = self.rank * self.W + worker
        rng = np.random.default_rng([self.seed & _M64, self.epoch, self.rank, worker,
                                     self.world_size, 0x5B0F])
        start = 0 if self.resampled else r * self.per
        return _bounded_shuffle(start, self.per, self.shuffle_buffer, rng)

    def _fetcher(self, needed: list[int], worker: int):
        """Random access to ``needed`` positions (in about increasing order) of this epoch."""
        if self.mix is None:
            return _Fetcher(self._read(set(needed), min(needed), max(needed), worker))
        if self._mixed is None:
            self._mixed = MixedEpoch(self.mix, self.seed, self.epoch)
        # late-bound: _problems is replaced each time the batches hand their problems on
        return MixFetcher(self._mixed, needed, lambda p: self._problems.append(p), _Fetcher)

    def _sources(self, fetch, positions: list[int]) -> dict[str, int]:
        if self.mix is None:
            return {}
        return fetch.sources(positions, [s.name for s in self.mix.sources])

    def _read(self, needed: set[int], lo: int, hi: int,
              worker: int) -> Iterator[tuple[int, str, dict | None]]:
        """Samples at positions lo..hi in order; data read only for ``needed`` positions."""
        if self.ss.counts is None:
            yield from self._read_uncounted(needed, hi, worker)
            return
        order, starts = self.layout(worker)
        for t, shard in enumerate(order):
            s, c = starts[t], self.ss.counts[shard]
            if s + c <= lo or s > hi:
                continue
            # a damaged shard's lost samples come as BadImage of its kind (shard_read.py)
            for i, key, members in read_shard(
                self.ss.urls[shard], want=lambda i, s=s: s + i in needed,
                stop=min(c, hi - s + 1), on_problem=self._problems.append,
            ):
                yield s + i, key, members

    def _read_uncounted(self, needed: set[int], hi: int,
                        worker: int) -> Iterator[tuple[int, str, dict | None]]:
        """Resampled mode over shards of unknown length (remote, no index): shards drawn
        uniformly by (seed, epoch, rank, worker), each read whole, positions numbered as the
        samples arrive. Still a pure function of the arguments and the shards' bytes, but a
        resumed worker reads (without decoding) everything before its position again."""
        rng = np.random.default_rng([self.seed & _M64, self.epoch, self.rank, worker, 0x2E5B])
        pos, empty = 0, 0
        while True:
            for shard in rng.integers(0, len(self.ss.urls), size=64).tolist():
                got = 0
                for i, key, members in read_shard(self.ss.urls[shard],
                                                  want=lambda i, s=pos: s + i in needed,
                                                  on_problem=self._problems.append):
                    if pos + i > hi:
                        return
                    got = i + 1
                    yield pos + i, key, members
                pos += got
                empty = 0 if got else empty + 1
                if empty >= 64:
                    raise TooManyBadSamples(f"64 shards drawn in a row gave no sample (e.g. "
                                            f"{self.ss.urls[shard]}); check the shard URLs")

    def _worker(self, worker: int) -> Iterator[dict]:
        B = self.batch_size
        skip = self.worker_skip(worker)
        todo = self.positions(worker)[skip * B:]
        if not todo:
            return
        self._aug_key = (self.rank, worker, 0x2E5A) if self.resampled else ()
        fetch = self._fetcher(todo, worker)
        aug_gen = torch.Generator()
        bad_total, seen, logged = 0, 0, 0
        bad_kinds: Counter[str] = Counter()
        # the same threshold with or without skip, so a resumed loader does not judge its short
        # tail more harshly than the full run did (it only counts what it has seen itself)
        judge_after = min(_MIN_JUDGED, self.per)
        for b in range(len(todo) // B):
            slots = todo[b * B:(b + 1) * B]
            good: list[tuple[int, str, dict, int, torch.Tensor]] = []
            bad: Counter[str] = Counter()
            for pos in slots:
                got = fetch.get(pos)
                out = self._decode(pos, got, aug_gen, repeat=0)
                if isinstance(out, tuple):
                    good.append((pos, got[0], got[1], *out))
                else:
                    bad[out.kind] += 1
                    # a damaged shard is logged once, by the main process (ShardLoader)
                    if logged < _MAX_LOGGED and out.kind not in SHARD_KINDS:
                        logged += 1
                        key = got[0] if got and got[0] else f"<position {pos}>"
                        log.warning("skipping bad sample %s (%s): %s", key, out.kind, out.reason)
            seen += len(slots)
            bad_total += sum(bad.values())
            bad_kinds.update(bad)
            if seen >= judge_after and bad_total > self.max_bad_fraction * seen:
                raise TooManyBadSamples(
                    f"{bad_total} of {seen} samples ({bad_total / seen:.2%}) were bad "
                    f"({dict(sorted(bad_kinds.items()))}), above max_bad_fraction="
                    f"{self.max_bad_fraction}: check the shards with `mae-scale data verify` "
                    "(data_pipeline.verify_shards), or raise max_bad_fraction"
                )
            if len(good) < B:
                good = self._refill(good, B, worker, (skip + b + 1) * B, fetch, aug_gen)
            imgs = [g[4] for g in good]
            yield {
                "image": imgs if self.raw_jpeg else torch.stack(imgs),
                "key": [g[1] for g in good],
                "label": torch.tensor([g[3] for g in good], dtype=torch.int64),
                "bad": dict(bad),
                "shards": self._take_problems(),
                "sources": self._sources(fetch, [g[0] for g in good]),
                "unlabelled": sum(g[3] < 0 for g in good),
            }

    def _decode(self, pos: int, got: tuple[str, dict] | None, gen: torch.Generator,
                repeat: int) -> tuple[int, torch.Tensor] | BadImage:
        """(label, image) or the reason the sample is bad."""
        try:
            data, label = image_and_label(None if got is None else got[1], self.keys)
        except BadImage as e:
            return e
        # resampled: positions are per worker and samples repeat, so the worker is in the key
        gen.manual_seed(_mix(self.seed, self.epoch, pos, repeat, *self._aug_key))
        try:
            if self.raw_jpeg:
                raw = _raw_jpeg(data, self.augment, gen)
                if raw is not None:
                    return label, raw
            return label, self.augment(data, gen)
        except BadImage as e:
            return e
        except (RuntimeError, ValueError, OSError) as e:
            return BadImage("undecodable", f"{type(e).__name__}: {e}")

    def _refill(self, good: list, B: int, worker: int, done: int, fetch: _Fetcher,
                gen: torch.Generator) -> list:
        """Top a batch up to B with fresh augmentations of its good samples (see module doc).

        ``done``: how many of the worker's positions precede the ones after this batch.
        """
        donors = list(good)
        if not donors:
            # whole batch bad: borrow the next good sample in the worker's order, wrapping to
            # the start of its range; a pure function of the data, so resume stays exact
            order = self.positions(worker)
            later, earlier = order[done:], order[: done - B]
            donor = self._first_good(later, fetch, gen)
            if donor is None and earlier:
                donor = self._first_good(earlier, self._fetcher(earlier, worker), gen)
            if donor is None:
                raise TooManyBadSamples(
                    f"rank {self.rank}: no sample in its worker range {worker} decodes; check "
                    "the shards with data_pipeline.verify_shards"
                )
            donors = [donor]
        out = list(good)
        repeat = 1 + (not good)  # repeat 1 was used for the borrowed donor itself
        while len(out) < B:
            for pos, key, members, _, _ in donors:
                if len(out) == B:
                    break
                label, img = self._decode(pos, (key, members), gen, repeat=repeat)
                out.append((pos, key, members, label, img))
            repeat += 1
        return out

    def _first_good(self, candidates: list[int], fetch: _Fetcher, gen: torch.Generator):
        for pos in candidates:
            got = fetch.get(pos, keep=True)  # keep: it is still emitted in its own batch
            out = self._decode(pos, got, gen, repeat=1)
            if isinstance(out, tuple):
                return (pos, got[0], got[1], *out)
        return None


def make_loader(
    shards: str | os.PathLike | Sequence[str | os.PathLike] | ShardSet | Sequence[dict] | Mix,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    epoch: int = 0,
    seed: int = 0,
    skip_samples: int = 0,
    input_size: int = 224,
    augment: str | Augment = "mae",
    max_bad_fraction: float = 0.01,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    resampled: bool = False,
    epoch_samples: int | None = None,
    decode_device: str = "cpu",
    image_key: str | None = None,
    label_key: str | None = None,
) -> ShardLoader:
    """The batches of one rank for one epoch; see the module docstring for the exact semantics.

    ``skip_samples`` (a multiple of ``batch_size``): samples this rank already consumed in this
    epoch; the loader yields exactly the batches an unskipped loader yields after that many,
    without decoding the skipped ones. ``augment``: ``"mae"`` or a callable
    ``(bytes, torch.Generator) -> uint8 [3, S, S]``.

    ``resampled``: draw samples with replacement (random shards, see the module docstring) for
    an epoch of ``epoch_samples`` samples over all ranks (default: the data set's size).

    ``decode_device``: ``"cpu"`` (default): workers decode and augment. Any other torch device
    string (``"cuda"``, ``"cuda:1"``): workers only draw the crop/flip (from the JPEG header's
    size, the same draws as the CPU path) and pass the JPEG bytes on; this process decodes each
    batch with ``torchvision.io.decode_jpeg(list, device=...)`` (batched nvJPEG), crops, resizes
    and flips there, and ``batch["image"]`` lives on that device. Non-JPEG and CMYK images are
    still done by the workers. ``"cpu-batched"`` runs that same path on the CPU (for tests).

    ``shards`` as a list of ``{"shards": SPEC, "weight": W, "name": optional}`` (or a
    :class:`Mix`): a weighted mix of sources, epochs of ``epoch_samples`` (default: the sum of
    the sources' sizes; see ``mix.py``). ``image_key`` / ``label_key``: which members hold the
    image and the label (``keys.py``; default ``jpg;jpeg;png;webp;...`` and ``cls``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if skip_samples < 0 or skip_samples % batch_size:
        raise ValueError(f"skip_samples={skip_samples} must be a non-negative multiple of "
                         f"batch_size={batch_size} (it counts whole consumed batches)")
    mixed = isinstance(shards, Mix) or is_mix_spec(shards)
    if epoch_samples is not None and not resampled and not mixed:
        raise ValueError("epoch_samples only applies with resampled=True or a mix of sources")
    if mixed and resampled:
        raise ValueError("resampled=True does not combine with a mix of sources (a mix already "
                         "draws each source in proportion to its weight)")
    if epoch_samples is not None and epoch_samples < 1:
        raise ValueError(f"epoch_samples must be >= 1, got {epoch_samples}")
    keys = parse_keys(image_key, label_key)
    mix = None
    if mixed:
        mix = shards if isinstance(shards, Mix) else resolve_mix(shards, epoch_samples)
        ss = mix.sources[0].shards
    else:
        ss = shards if isinstance(shards, ShardSet) else resolve_shards(shards, resampled=resampled)
    aug = MAEAugment(input_size) if augment == "mae" else augment
    if not callable(aug):
        raise ValueError(f"augment must be 'mae' or a callable, got {augment!r}")
    dev = _decode_device(decode_device, aug)
    stream = ShardStream(
        ss, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
        epoch=epoch, seed=seed, skip_batches=skip_samples // batch_size, augment=aug,
        max_bad_fraction=max_bad_fraction, shuffle_buffer=shuffle_buffer, resampled=resampled,
        epoch_samples=epoch_samples, raw_jpeg=dev is not None, keys=keys, mix=mix,
    )
    W = stream.W
    if stream.per == 0:
        n = (f"epoch_samples={stream.epoch_samples}" if resampled or mix is not None
             else f"{ss.total} samples")
        raise ValueError(
            f"{n} cannot give each of {world_size} ranks x {W} workers one batch "
            f"of {batch_size}; lower batch_size or num_workers, or add data"
        )
    loader = ShardLoader(stream, num_workers, pin_memory,
                         prefetch_factor if num_workers > 0 else None, decode_device=dev)
    if stream.skip_batches > len(loader):
        raise ValueError(f"skip_samples={skip_samples} is more than this rank's epoch of "
                         f"{len(loader) * batch_size} samples")
    return loader
