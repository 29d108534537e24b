"""The main-process side of the training stream (``stream.py``): :class:`ShardLoader` runs the
workers (or none), logs each damaged shard once, sums bad samples, source shares and unlabelled
samples per iteration, and decodes batches on the device when asked (``decode_device``).

Batched decode (``decode_device`` other than ``"cpu"``): workers draw each JPEG's crop/flip
from its header size with the very generator and draws of the CPU path (so the same crops) but
do not decode; they pass ``RawJPEG`` (bytes + parameters) on, and this process decodes the
batch with ``torchvision.io.decode_jpeg(list, device=decode_device)`` (batched nvJPEG on CUDA),
crops, resizes (bicubic, antialias) and flips there (``augment.decode_batch``); the batch's
``image`` is on ``decode_device``. Non-JPEG, CMYK/YCCK and header-less JPEGs are decoded by the
workers as usual; a JPEG the device decoder rejects is decoded on the CPU with the same
parameters. One that no decoder reads is only found in this process: it counts as
``undecodable`` and its slot gets a flipped copy of another image of the batch (key and label
too) instead of a fresh crop. ``decode_device="cpu-batched"`` runs this path on the CPU; it
matches the CPU path's output up to resize rounding (the CI check of the CUDA path's logic).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from . import augment as _augment
from .augment import MAEAugment, decode_batch
from .errors import TooManyBadSamples
from .loader_guard import guard_workers, ignore_stop_signals
from .shard_read import warn_shard_once

if TYPE_CHECKING:
    from .stream import ShardStream

__all__ = ["ShardLoader"]

Augment = Callable[[bytes, torch.Generator], torch.Tensor]

log = logging.getLogger(__name__)

_MIN_JUDGED = 200  # as in stream.py: samples seen before the bad share is judged


class ShardLoader:
    """Iterable of batches ``{"image": uint8 [B,3,S,S], "key": list[str], "label": int64 [B]}``
(``image`` on the decode device when ``decode_device`` is not ``"cpu"``).

    ``len()`` is the full epoch's batch count for this rank (identical on all ranks, unaffected
    by ``skip_samples``); ``remaining`` is what one iteration yields. ``bad_counts`` holds the
    bad samples by kind seen during the current/last iteration.
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool,
                 prefetch_factor: int | None, decode_device: torch.device | None = None) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.decode_device = decode_device  # None: workers decode (the CPU path)
        self.bad_counts: Counter[str] = Counter()
        self.bad_shards: dict[str, str] = {}  # url -> kind of each damaged shard met
        self.source_counts: Counter[str] = Counter()  # a mix: samples per source this iteration
        self.unlabelled = 0  # samples given without a label (label -1) this iteration
        self._seen = self._failed = 0

    def __len__(self) -> int:
        return self.stream.W * self.stream.batches_per_worker

    @property
    def remaining(self) -> int:
        return len(self) - self.stream.skip_batches

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees per epoch (``len(self) * batch_size``)."""
        return len(self) * self.stream.batch_size

    def __iter__(self) -> Iterator[dict]:
        self.bad_counts = Counter()
        self.bad_shards = {}
        self.source_counts, self.unlabelled = Counter(), 0
        if self.num_workers == 0:
            batches: Iterator[dict] = iter(self.stream)
        else:
            batches = guard_workers(DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers,
                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                persistent_workers=False, worker_init_fn=ignore_stop_signals,
            ), self.num_workers)
        self._seen = self._failed = 0
        try:
            for batch in batches:
                for problem in batch.pop("shards", ()):
                    self.bad_shards[problem.url] = problem.kind
                    warn_shard_once(problem)
                if "error" in batch:
                    raise TooManyBadSamples(batch["error"])
                self.bad_counts.update(batch.pop("bad"))
                self.source_counts.update(batch.pop("sources", {}))
                self.unlabelled += batch.pop("unlabelled", 0)
                if self.decode_device is not None:
                    self._decode(batch)
                yield batch
        finally:
            # stop the workers now (guard_workers' finally): a traceback the caller keeps holds
            # this frame, and workers that ignore SIGTERM would then hang the process's exit
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _decode(self, batch: dict) -> None:
        """Batched decode in this process (see ``make_loader(decode_device=...)``). A JPEG that
        no decoder reads (caught here, not in the worker) is bad: its slot gets a flipped copy
        of the next good image of the batch (and its key/label)."""
        imgs = decode_batch(batch["image"], self.stream.augment, self.decode_device)
        good = [k for k, im in enumerate(imgs) if im is not None]
        failed = len(imgs) - len(good)
        self._seen += len(imgs)
        self._failed += failed
        # judged like a worker's share (see _worker), over what this iteration decoded
        if not good or (self._seen >= min(_MIN_JUDGED, self.remaining * len(imgs))
                        and self._failed > self.stream.max_bad_fraction * self._seen):
            raise TooManyBadSamples(
                f"{self._failed} of {self._seen} samples failed the batched decode in the main "
                f"process, above max_bad_fraction={self.stream.max_bad_fraction}; check the "
                "shards with data_pipeline.verify_shards"
            )
        if failed:
            self.bad_counts["undecodable"] += failed
            log.warning("%d sample(s) of batch %s failed to decode in the main process",
                        failed, batch["key"])
            labels = batch["label"].clone()
            for k in range(len(imgs)):
                if imgs[k] is None:
                    d = next((g for g in good if g > k), good[0])
                    imgs[k] = imgs[d].flip(-1)
                    batch["key"][k] = batch["key"][d]
                    labels[k] = labels[d]
            batch["label"] = labels
        batch["image"] = torch.stack(imgs)


def _decode_device(decode_device: str, aug: Augment) -> torch.device | None:
    """None for the CPU (worker) path, else the device of the batched decode."""
    if decode_device == "cpu":
        return None
    dev = torch.device("cpu") if decode_device == "cpu-batched" else torch.device(decode_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"decode_device={decode_device!r} needs a CUDA GPU, but torch.cuda.is_available() "
            "is False; use decode_device='cpu' (workers decode) instead"
        )
    if not isinstance(aug, MAEAugment):
        raise ValueError(f"decode_device={decode_device!r} needs augment='mae' or a MAEAugment "
                         f"(it draws crops before decoding), got {aug!r}")
    if _augment.decode_jpeg is None:
        raise RuntimeError("decode_device other than 'cpu' needs torchvision.io.decode_jpeg, "
                           "which this torchvision lacks")
    return dev
