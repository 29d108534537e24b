"""Pretraining as a task of the loop: one objective (`mae_scale.objectives`) over the one encoder,
the MAE crop augmentation, reconstructions every `tracking.image_every_steps` (or epoch) and at the
end. Which objective it is never matters here: the objective builds the model and gives the loss
and the picture."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mae_scale.distributed import barrier
from mae_scale.optim import build_optimizer
from mae_scale.train.monitor import Monitor
from mae_scale.train.rundir import METRICS, MONITOR_CURVE
from mae_scale.visualize import normalize_on_device, save_monitor_curves

PICTURE_IMAGES = 4


class PretrainTask:
    step_logs: tuple[str, ...] = ()

    def __init__(self, objective):
        self.objective = objective
        self.picture: Optional[Path] = None
        self.picture_step: Optional[int] = None

    def bind(self, loop) -> None:
        self.loop, self.cfg, self.env = loop, loop.cfg, loop.env

    def prepare_data(self) -> None:
        """The shard spec to stream; `builtin` is made once (rank 0 first, then the others find it)."""
        self.shards = self.cfg.data.train_shards
        if self.shards != "builtin":
            return
        from data_pipeline import builtin_shards

        cache = Path(self.cfg.data.cache_dir or Path.home() / ".cache" / "mae-scale")
        if self.env.is_main:
            builtin_shards(cache)
        barrier()
        self.shards = str(builtin_shards(cache))

    def build_model(self, fresh: bool) -> torch.nn.Module:
        model = self.objective.build_model()
        init = self.cfg.model.init  # continued pretraining (the config allows it where the objective does)
        if init and fresh:
            from mae_scale.weights import load_init

            report = load_init(model, init, kind="pretrain", scratch_dir=self.loop.run_dir.path)
            if self.env.is_main:
                print(f"initialized from {init}: {report}", flush=True)
        return model

    def flops_per_image(self, model: torch.nn.Module) -> float:
        return self.objective.flops_per_image(model)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg)

    def loader(self, epoch: int, skip_batches: int):
        from data_pipeline import MAEAugment, make_loader

        d, t = self.cfg.data, self.cfg.train
        return make_loader(self.shards, t.micro_batch_size, rank=self.env.rank, world_size=self.env.world_size,
                           num_workers=d.num_workers, epoch=epoch, seed=t.seed,
                           skip_samples=skip_batches * t.micro_batch_size, input_size=d.input_size,
                           augment=MAEAugment(d.input_size, scale=(d.crop_scale_min, 1.0)),
                           max_bad_fraction=d.max_bad_fraction, resampled=d.resampled, epoch_samples=d.epoch_samples,
                           pin_memory=self.loop.pin_memory, image_key=d.image_key, label_key=d.label_key,
                           decode_device=(f"cuda:{torch.cuda.current_device()}" if d.decode_device == "cuda"
                                          else d.decode_device))

    def tracked_params(self, params: dict) -> dict:
        """Without the model.* settings only other objectives read (a BEiT run has no mask ratio)."""
        from mae_scale.config_checks import objective_fields

        unread = {f"model.{name}" for name in objective_fields()} - {f"model.{n}" for n in self.objective.reads}
        return {k: v for k, v in params.items() if k not in unread}

    def started(self) -> None:
        mon = self.cfg.monitor
        self.monitor = Monitor(self.cfg, self.env, self.objective) if mon.every_steps or mon.knn_every_steps else None

    def micro_loss(self, micro: int, batch: dict):
        imgs = normalize_on_device(batch["image"], self.env.device)
        return self.objective.loss(self.loop.engine, imgs, self.loop.micro_key(micro))

    # -- pictures --------------------------------------------------------------------------------

    def before_train(self) -> None:
        if self.monitor is not None and self.loop.global_step == 0:
            self._monitor(at_start=True)  # the curve starts at the initial weights

    def after_step(self, micro_batches: list[dict]) -> None:
        if self.monitor is not None:
            self._monitor()
        every = self.cfg.tracking.image_every_steps
        if every and self.loop.global_step % every == 0:
            self.picture = self._picture(micro_batches[0])

    def after_epoch(self, micro_batches: list[dict]) -> None:
        if not self.cfg.tracking.image_every_steps and micro_batches is not None:
            self.picture = self._picture(micro_batches[0])

    def after_train(self, micro_batches) -> None:
        if micro_batches is not None and self.picture_step != self.loop.global_step:
            self.picture = self._picture(micro_batches[0])  # the run always ends with a current picture
        run_dir = self.loop.run_dir
        if self.env.is_main and save_monitor_curves(run_dir.rows(METRICS), run_dir.file(MONITOR_CURVE)):
            self.loop.tracker.log_artifact(run_dir.file(MONITOR_CURVE))

    def _monitor(self, at_start: bool = False) -> None:
        """The monitor's figures when due: a row of their own in metrics.jsonl (cut back with it on a
        resume, so the curve has no duplicate or missing step) and MLflow metrics at the step."""
        loop = self.loop
        heldout, knn = self.monitor.due(loop.global_step, loop.end_step, at_start)
        if not (heldout or knn):
            return
        row = self.monitor.measure(loop.engine.module, heldout, knn)  # every rank: collective
        if self.env.is_main:
            loop.run_dir.append(METRICS, {"step": loop.global_step, "epoch": loop.epoch, **row})
            loop.tracker.log_metrics(row, step=loop.global_step)
            figures = " | ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("monitor_s",))
            print(f"monitor at step {loop.global_step}: {figures} ({row['monitor_s']:.1f} s)", flush=True)

    def before_save(self) -> None:
        pass

    def summary(self, result: dict) -> list[str]:
        """The task's lines of the report at the end."""
        lines = [f"reconstructions  {result['picture']}"]
        if result.get("loss_curve"):
            lines.append(f"loss curve       {result['loss_curve']}")
        if result.get("monitor_curve"):
            lines.append(f"monitor curve    {result['monitor_curve']}")
        return lines

    def result_extra(self) -> dict:
        picture = self.picture or self.loop.run_dir.newest_picture()  # None: a rerun of a finished run
        curve = self.loop.run_dir.file(MONITOR_CURVE)
        return {"picture": str(picture) if picture else None, **({"monitor_curve": str(curve)} if curve.is_file() else {})}

    def _picture(self, batch: dict) -> Optional[Path]:
        """Reconstructions of a few images of this step. Every rank runs the forward (ZeRO-3
        gathers parameters collectively); rank 0 writes and logs the picture."""
        loop = self.loop
        self.picture_step = loop.global_step  # the same on every rank: decides collective calls
        imgs = normalize_on_device(batch["image"][:PICTURE_IMAGES], self.env.device)
        grid = self.objective.picture(loop.engine.module, imgs, loop.micro_key(0, step=0))
        if not self.env.is_main:
            return None
        out = loop.run_dir.picture_path(loop.global_step)
        grid.save(out)
        loop.tracker.log_artifact(out, "reconstructions")
        return out
