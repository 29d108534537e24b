"""Batches that arrive on the device ahead of the step that needs them.

The loader's workers hand uint8 batches to the main process; copying them to a GPU in the step
itself would stall the GPU for the copy every micro-batch. `DevicePrefetcher` keeps one batch in
flight: while the model runs on batch i, batch i+1 is copied from pinned host memory with a
non-blocking copy on a side CUDA stream, and the step's stream waits for that copy only when it
uses the batch. On a CPU nothing needs copying: the same one-ahead order is kept, and the batches
are the loader's own tensors, so a run is bit for bit the same with prefetching on or off.

Only the keys named are moved (the images); labels stay on the host, where checks on them cost
no device synchronization.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional

import torch


class DevicePrefetcher:
    """Iterate `batches` (dicts of tensors) with `keys` already on `device`, one batch ahead.

    `limit`: how many batches will be consumed; never reads past it, so a run that stops
    mid-epoch decodes (and counts as bad) nothing it does not use."""

    def __init__(self, batches: Iterable[dict], device: torch.device, enabled: bool = True,
                 limit: Optional[int] = None, keys: tuple[str, ...] = ("image",)):
        self.batches, self.device, self.enabled, self.limit, self.keys = batches, torch.device(device), enabled, limit, keys
        self.stream = torch.cuda.Stream(self.device) if enabled and self.device.type == "cuda" else None

    def _stage(self, batch: dict) -> dict:
        """Start the batch's copy to the device (CUDA: on the side stream, from pinned memory)."""
        if self.stream is None:
            return batch
        out = dict(batch)
        with torch.cuda.stream(self.stream):
            for key in self.keys:
                tensor = batch.get(key)
                if torch.is_tensor(tensor) and tensor.device != self.device:
                    if not tensor.is_pinned():  # a non-pinned source makes the "async" copy synchronous
                        tensor = tensor.pin_memory()
                    out[key] = tensor.to(self.device, non_blocking=True)
        return out

    def _ready(self, batch: dict) -> dict:
        """Make the step's stream wait for the copy, and tell the allocator who uses the memory."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for key in self.keys:
                tensor = batch.get(key)
                if torch.is_tensor(tensor) and tensor.device == self.device:
                    tensor.record_stream(current)
        return batch

    def __iter__(self) -> Iterator[dict]:
        source = iter(self.batches)
        remaining = self.limit if self.limit is not None else math.inf

        def take() -> Optional[dict]:
            nonlocal remaining
            batch = next(source, None) if remaining > 0 else None
            remaining -= batch is not None
            return batch

        if not self.enabled:
            while (batch := take()) is not None:
                yield batch
            return
        batch = take()
        pending = self._stage(batch) if batch is not None else None
        while pending is not None:
            batch = take()
            ahead = self._stage(batch) if batch is not None else None  # in flight while `pending` is used
            yield self._ready(pending)
            pending = ahead
