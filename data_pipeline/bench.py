"""`mae-scale bench data`: images/s of the project's loader against the official MAE pipeline
(PIL decode + torchvision RandomResizedCrop/flip + ToTensor + Normalize, float output), on the
same shards, with the same number of worker processes, side by side in one run.

Per-core figures divide by the number of processes that do the work (workers, or 1 when the
main process decodes). Each configuration is timed over whole passes of the shards; the table
shows the median of the repeats and the ratio of the medians.

``decode_device`` picks where the project's loader decodes (``make_loader(decode_device=...)``):
``cpu`` in the workers, ``cuda`` batched with nvJPEG in the main process (the workers only read
the JPEG headers and draw the crops), ``cpu-batched`` that batched path on the CPU. The official
pipeline always decodes with PIL in the workers: it is the fixed reference. With ``cuda`` the
main process does the decoding on the GPU, so "per core" still divides by the worker count (the
CPU cores the loader occupies besides the trainer's own process).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .stream import make_loader, resolve_shards
from .shard_read import read_shard
from .tario import IMAGE_EXTS


class OfficialPipeline(IterableDataset):
    """The official MAE training transform, reading the same tar shards (split across workers)."""

    def __init__(self, urls: tuple[str, ...], input_size: int):
        from torchvision import transforms

        self.urls = urls
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])

    def __iter__(self):
        import io

        from PIL import Image

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::workers]:
            # a damaged or missing shard is passed over, as the project's loader does
            for _, _, members in read_shard(url):
                data = next((members[e] for e in IMAGE_EXTS if e in members), None)
                if data is None:
                    continue
                try:
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                except Exception:
                    continue
                yield self.transform(img)


def _time_pass(make_iter) -> tuple[int, float]:
    t0 = time.perf_counter()
    count = 0
    for batch in make_iter():
        count += (batch["image"] if isinstance(batch, dict) else batch).shape[0]
    return count, time.perf_counter() - t0


DECODE_DEVICES = ("cpu", "cuda", "cpu-batched")


def _time_pass_synced(make_iter, device: str) -> tuple[int, float]:
    """A pass whose clock stops only when the device has finished the last batch's decode."""
    if device != "cuda":
        return _time_pass(make_iter)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    count, _ = _time_pass(make_iter)
    torch.cuda.synchronize()
    return count, time.perf_counter() - t0


def _as_mix(ss) -> list[dict]:
    """The same shards as two sources (first half, second half), weighted by their sizes: the
    mixed epoch then holds the very samples of the single-source one, so only the mixing differs."""
    from .shardset import ShardSet

    h = max(1, len(ss.urls) // 2)
    halves = [ShardSet(ss.urls[:h], ss.counts[:h]), ShardSet(ss.urls[h:], ss.counts[h:])]
    return [{"shards": x, "weight": x.total, "name": f"half{i}"} for i, x in enumerate(halves) if x.urls]


def bench_data(shards: str, workers: int = 1, batch_size: int = 64, input_size: int = 224,
               repeats: int = 3, decode_device: str = "cpu", mix: bool = False) -> dict:
    if decode_device not in DECODE_DEVICES:
        raise ValueError(f"decode_device {decode_device!r} must be one of {', '.join(DECODE_DEVICES)}")
    if decode_device == "cuda" and not torch.cuda.is_available():
        raise ValueError("decode_device 'cuda' needs a CUDA GPU, and torch sees none")
    torch.set_num_threads(1)  # one core per process, as in a real multi-worker loader
    shard_set = resolve_shards(shards)
    cores = max(workers, 1)
    what = "decode_jpeg + crop-then-resize" if decode_device == "cpu" else f"batched decode_jpeg on {decode_device}"
    ours = f"project ({what}, uint8)"

    def project():
        return make_loader(shards, batch_size, num_workers=workers, input_size=input_size, epoch=0,
                           decode_device=decode_device)

    def official():
        return DataLoader(OfficialPipeline(shard_set.urls, input_size), batch_size=batch_size, num_workers=workers)

    rates: dict[str, list[float]] = {ours: [], "official MAE (PIL + torchvision, float)": []}
    makers = [project, official]
    if mix:  # --as-mix: the project's loader over the same shards as a two-source mix, alongside
        sources = _as_mix(shard_set)

        def mixed():
            return make_loader(sources, batch_size, num_workers=workers, input_size=input_size, epoch=0,
                               decode_device=decode_device)

        rates[f"{ours}, same shards as a 2-source mix"] = []
        makers.append(mixed)
    for _ in range(repeats):  # alternate them so that machine noise hits all alike
        for name, make in zip(rates, makers):
            count, seconds = _time_pass_synced(make, decode_device)
            rates[name].append(count / seconds)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians["official MAE (PIL + torchvision, float)"]
    lines = [
        f"shards: {shard_set.total} samples in {len(shard_set.urls)} shards; workers: {workers}; "
        f"batch {batch_size}; {input_size} px; project decodes on {decode_device}; median of {repeats} passes",
        "| pipeline | images/s | images/s per core | x official |",
        "|---|---|---|---|",
    ]
    for name, rate in medians.items():
        lines.append(f"| {name} | {rate:.0f} | {rate / cores:.0f} | {rate / base:.2f} |")
    if mix:
        lines.append(f"mixing: {medians[f'{ours}, same shards as a 2-source mix'] / medians[ours]:.3f} x the "
                     "single-source images/s")
    return {"medians": medians, "per_core": {k: v / cores for k, v in medians.items()},
            "ratio": medians[ours] / base, "decode_device": decode_device,
            "workers": workers, "samples": shard_set.total, "table": "\n".join(lines)}
