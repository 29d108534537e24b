"""Early signals that pretraining works, for any objective: a held-out loss and an online k-NN.

- Held-out objective loss (`monitor.every_steps`): the objective's own loss on the first
  `monitor.val_samples` samples of `data.val_shards`, center-cropped, with masks drawn from each
  image's own seed (a hash of its sample key), so the figure depends only on the weights: the same
  across steps, resumes, runs and world sizes (up to float rounding of the batch composition). Every
  objective masks the same number of units per image, so the mean of batch losses weighted by batch
  size is the mean over images.
- Online k-NN (`monitor.knn_every_steps`, DINO's weighted k-NN, `mae_scale.knn`): the encoder's
  features without masking (cls token and mean of the patch tokens, both L2-normalized) of the
  first `knn_train_samples` of `monitor.knn_train_shards` as the bank and of `knn_val_samples` of
  `monitor.knn_val_shards` as queries; top-1 / top-5. Without `knn_val_shards` one set is split:
  its first `knn_val_samples` are the queries and the bank is the `knn_train_samples` after them.

The ranks share the work (each sample read and counted once, `data_pipeline.eval_stream`); a rank
that runs out of batches keeps forwarding a dummy image while others still have some, so ZeRO-3's
collective parameter gathering never waits on it. The model runs in eval mode under no_grad and no
draw touches a generator the training uses, so a run with the monitor on trains exactly like one
with it off.
"""

from __future__ import annotations

import time
import zlib

import torch

from mae_scale.distributed import DistEnv, all_reduce_sum, any_rank
from mae_scale.knn import distributed_knn_accuracy, encoder_features
from mae_scale.seeding import derived_seed
from mae_scale.visualize import normalize_on_device

HELDOUT_SEED = 0x4E1D  # the held-out masks' seed: fixed, so every run draws the same masks
EVAL_CROP_PCT = 0.875  # center crop of the resized image, as every evaluation here


def sample_seed(key: str) -> int:
    """An image's own mask seed, from its sample key (stable across splits, runs and machines)."""
    return derived_seed(HELDOUT_SEED, zlib.crc32(key.encode()))


class Monitor:
    def __init__(self, cfg, env: DistEnv, objective):
        self.cfg, self.env, self.objective = cfg, env, objective
        self.mon = cfg.monitor

    def due(self, step: int, end_step: int, at_start: bool = False) -> tuple[bool, bool]:
        """(held-out loss, k-NN) due after `step`: on their cadence, at the run's last step, and
        before the first step of a new run (`at_start`)."""
        def on(every: int) -> bool:
            return bool(every) and (at_start or step % every == 0 or step == end_step)

        return on(self.mon.every_steps), on(self.mon.knn_every_steps)

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, heldout: bool, knn: bool) -> dict:
        """The due figures, identical on every rank; model's train/eval mode restored after."""
        was_training = model.training
        model.eval()
        started, row = time.perf_counter(), {}
        try:
            if heldout:
                row.update(self._heldout_loss(model))
            if knn:
                row.update(self._knn(model))
        finally:
            model.train(was_training)
        row["monitor_s"] = time.perf_counter() - started
        return row

    # -- the data ------------------------------------------------------------------------------

    def _batches(self, shards: str, limit: int, model: torch.nn.Module, offset: int = 0):
        """This rank's batches of `limit` samples from position `offset`, normalized on the device;
        after the last one, dummy forwards in lockstep until every rank is done (ZeRO-3)."""
        from data_pipeline.eval_stream import make_eval_loader
        from data_pipeline.finetune_augment import EvalTransform

        d = self.cfg.data
        loader = make_eval_loader(shards, self.mon.batch_size, rank=self.env.rank, world_size=self.env.world_size,
                                  transform=EvalTransform(d.input_size, crop_pct=EVAL_CROP_PCT),
                                  image_key=d.image_key, label_key=d.label_key, limit=limit, offset=offset)
        batches = iter(loader)
        while True:
            batch = next(batches, None)
            if not any_rank(batch is not None, self.env.device):
                return
            if batch is None:  # this rank is done; keep a ZeRO-3 forward collective company
                self.objective.features(model, torch.zeros(1, 3, d.input_size, d.input_size, device=self.env.device))
                continue
            yield batch, normalize_on_device(batch["image"], self.env.device)

    # -- the figures ---------------------------------------------------------------------------

    def _heldout_loss(self, model: torch.nn.Module) -> dict:
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # loss x images, images
        for batch, imgs in self._batches(self.cfg.data.val_shards, self.mon.val_samples, model):
            seeds = [sample_seed(key) for key in batch["key"]]
            loss = self.objective.heldout_loss(model, imgs, seeds).double()
            sums += torch.stack([loss * len(seeds), torch.tensor(float(len(seeds)), dtype=torch.float64,
                                                                  device=self.env.device)])
        total, count = all_reduce_sum(sums).tolist()
        return {"heldout_loss": total / count if count else float("nan"), "heldout_samples": int(count)}

    def _features(self, model: torch.nn.Module, shards: str, limit: int,
                  offset: int = 0) -> tuple[dict, torch.Tensor]:
        """This rank's features {cls, mean} [n, D] and labels [n] of `limit` samples from `offset`."""
        feats: dict[str, list[torch.Tensor]] = {"cls": [], "mean": []}
        labels = []
        for batch, imgs in self._batches(shards, limit, model, offset):
            for name, f in encoder_features(self.objective.features(model, imgs)).items():
                feats[name].append(f)
            labels.append(batch["label"].to(self.env.device))
        dim = model.patch_embed.proj.out_channels
        empty = torch.zeros(0, dim, device=self.env.device)
        return ({k: torch.cat(v) if v else empty for k, v in feats.items()},
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=self.env.device))

    def _knn(self, model: torch.nn.Module) -> dict:
        mon = self.mon
        split = not mon.knn_val_shards  # one set: the queries first, the bank after them
        query, query_labels = self._features(model, mon.knn_val_shards or mon.knn_train_shards, mon.knn_val_samples)
        bank, bank_labels = self._features(model, mon.knn_train_shards, mon.knn_train_samples,
                                           offset=mon.knn_val_samples if split else 0)
        local_top = max([int(t.max()) for t in (bank_labels, query_labels) if len(t)] or [0])
        num_classes = _max_over_ranks(local_top, self.env.device) + 1  # labels 0..C-1: the largest names C
        row = {}
        for name in ("cls", "mean"):
            result = distributed_knn_accuracy(bank[name], bank_labels, query[name], query_labels, num_classes,
                                              k=mon.knn_k, temperature=mon.knn_temperature)
            row[f"knn_top1_{name}"], row[f"knn_top5_{name}"] = result["top1"], result["top5"]
        row["knn_samples"] = result["samples"]
        return row


def _max_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())
