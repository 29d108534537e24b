"""Top-1 / top-5 / loss of a classifier over a whole validation set, across all ranks.

Every sample is counted once: the eval loader gives each rank its own contiguous share (uneven
shares allowed, last batch partial), each rank sums loss, hits and count, and one all-reduce adds
them up. Ranks may have different batch counts, but a ZeRO-3 forward gathers parameters
collectively, so every rank keeps stepping (a rank that ran out forwards one dummy image) until
no rank has a batch left.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.nn.functional as F

from mae_scale.distributed import DistEnv, all_reduce_mean, all_reduce_sum, any_rank
from mae_scale.visualize import normalize_on_device


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_shards: str, env: DistEnv, *, input_size: int, crop_pct: float,
             batch_size: int, num_workers: int, num_classes: int, image_key: str | None = None,
             label_key: str | None = None) -> dict:
    """Returns {acc1, acc5, loss, samples, bad_samples, seconds} (percentages; identical on every rank)."""
    from data_pipeline.eval_stream import make_eval_loader
    from data_pipeline.finetune_augment import EvalTransform

    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    loader = make_eval_loader(val_shards, batch_size, rank=env.rank, world_size=env.world_size,
                              num_workers=num_workers, transform=EvalTransform(input_size, crop_pct=crop_pct),
                              image_key=image_key, label_key=label_key)
    k5 = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top-1 hits, top-5 hits, count
    started = time.perf_counter()
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if not any_rank(batch is not None, env.device):
            break
        if batch is None:  # this rank is done; keep a ZeRO-3 forward collective company
            model(torch.zeros(1, 3, input_size, input_size, device=env.device, dtype=dtype))
            continue
        labels = batch["label"].to(env.device)
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(f"validation labels must be in [0, {num_classes}); got {labels.min().item()}.."
                             f"{labels.max().item()} (unlabelled shards, or model.num_classes too small)")
        logits = model(normalize_on_device(batch["image"], env.device).to(dtype)).float()
        top = logits.topk(k5, dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, :1].any(1).sum().double(), hits.any(1).sum().double(),
                             torch.tensor(float(len(labels)), dtype=torch.float64, device=env.device)])
    bad = Counter(loader.bad_counts)
    sums = all_reduce_sum(torch.cat([sums, torch.tensor([float(sum(bad.values()))], dtype=torch.float64,
                                                         device=env.device)]))
    model.train(was_training)
    loss, top1, top5, count, bad_total = sums.tolist()
    if count == 0:
        raise ValueError(f"no readable validation samples in {val_shards}")
    return {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss / count,
            "samples": int(count), "bad_samples": int(bad_total), "seconds": time.perf_counter() - started}


def sync_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks: each rank saw
    other images, and evaluation and checkpoints must use one set of statistics."""
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.copy_(all_reduce_mean(buf).to(buf.dtype))
