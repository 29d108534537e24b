"""Fine-tuning and linear probing as a task of the same loop, checkpoints and MLflow tracking as
pretraining; `evaluate_only` for `--eval-only`.

- Fine-tuning (MAE appendix A.2): timm ViT with global average pooling, layer-wise LR decay
  (`mae_scale.optim.param_groups_lrd`), AdamW, RandAugment, random erasing, Mixup/CutMix with
  soft-target cross entropy or label smoothing, drop path.
- Linear probing (appendix A.3): frozen encoder, BatchNorm (no affine) + linear head on the cls
  token, LARS; BatchNorm statistics are averaged over the ranks before each evaluation and save.

Everything random in a step (mixup draws, erasing, drop path) is seeded from (seed, step, rank,
micro-batch), so a resumed run takes the same steps as an uninterrupted one. Evaluation runs at
the end of every `train.eval_every_epochs`-th epoch and at the end; results go to eval.jsonl,
the terminal and MLflow; the best and last top-1 are in result.json.
"""

from __future__ import annotations

import torch

from mae_scale.distributed import DistEnv, broadcast_object
from mae_scale.evaluate import evaluate, sync_buffers
from mae_scale.lars import LARS, lars_param_groups
from mae_scale.models import build_vit_classifier
from mae_scale.optim import param_groups_lrd
from mae_scale.seeding import seed_everything
from mae_scale.speed import classifier_train_flops
from mae_scale.train.rundir import EVALS
from mae_scale.visualize import normalize_on_device
from mae_scale.weights import WeightsError, load_init

MIXUP_STREAM = 0xF17E  # the micro-batch's stream for mixup, erasing and drop path (`MicroKey.seed_for`)


def build_classifier(cfg) -> torch.nn.Module:
    m, probe = cfg.model, cfg.mode == "linprobe"
    model = build_vit_classifier(m.arch, m.num_classes, img_size=cfg.data.input_size,
                                 drop_path_rate=0.0 if probe else m.drop_path, global_pool=m.global_pool,
                                 linear_probe=probe, layer_scale=m.layer_scale)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_classifier_init(model: torch.nn.Module, cfg) -> dict:
    return load_init(model, cfg.model.init, kind=cfg.mode, scratch_dir=cfg.output_dir)


def _evaluate(model: torch.nn.Module, cfg, env: DistEnv) -> dict:
    d = cfg.data
    return evaluate(model, d.val_shards, env, input_size=d.input_size, crop_pct=d.eval_crop_pct,
                    batch_size=d.eval_batch_size, num_workers=d.num_workers, num_classes=cfg.model.num_classes,
                    image_key=d.image_key, label_key=d.label_key)


class ClassifyTask:
    step_logs = (EVALS,)

    def __init__(self, cfg):
        self.probe = cfg.mode == "linprobe"
        self.last_eval_step = None

    def bind(self, loop) -> None:
        self.loop, self.cfg, self.env = loop, loop.cfg, loop.env

    def prepare_data(self) -> None:
        self.shards = self.cfg.data.train_shards

    # -- model, optimizer, data ------------------------------------------------------------------

    def build_model(self, fresh: bool) -> torch.nn.Module:
        model = build_classifier(self.cfg)
        if self.cfg.model.init and fresh:  # a resume ignores the init
            report = load_classifier_init(model, self.cfg)
            if self.env.is_main:
                print(f"initialized from {self.cfg.model.init}: {report}", flush=True)
        return model

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "lars":  # one group per parameter: DeepSpeed hides the shapes LARS needs
            return LARS(lars_param_groups(model, o.weight_decay), lr=0.0, momentum=o.momentum)
        if self.probe:  # the head only
            groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                       "weight_decay": o.weight_decay, "lr_scale": 1.0}]
        else:
            groups = param_groups_lrd(model, o.weight_decay, o.layer_decay)
            for group in groups:
                group.pop("param_names")  # for inspection only; the engine gets plain groups
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum)
        fused = torch.cuda.is_available() and next(model.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), fused=fused or None)

    def flops_per_image(self, model: torch.nn.Module) -> float:
        return classifier_train_flops(model, 1, frozen_encoder=self.probe)

    def loader(self, epoch: int, skip_batches: int):
        from data_pipeline import make_loader
        from data_pipeline.finetune_augment import FinetuneAugment

        d, t = self.cfg.data, self.cfg.train
        augment = FinetuneAugment(d.input_size, scale=(d.crop_scale_min, 1.0), auto_augment=d.auto_augment or None)
        return make_loader(self.shards, t.micro_batch_size, rank=self.env.rank, world_size=self.env.world_size,
                           num_workers=d.num_workers, epoch=epoch, seed=t.seed,
                           skip_samples=skip_batches * t.micro_batch_size, input_size=d.input_size,
                           augment=augment, max_bad_fraction=d.max_bad_fraction, pin_memory=self.loop.pin_memory,
                           image_key=d.image_key, label_key=d.label_key)

    def tracked_params(self, params: dict) -> dict:
        return params

    def started(self) -> None:
        self.param_dtype = next(self.loop.engine.module.parameters()).dtype
        self.mixup, self.criterion = self._mixup_and_criterion()
        self.eraser = None
        if self.cfg.data.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.eraser = RandomErasing(self.cfg.data.reprob, mode="pixel", max_count=1, device=str(self.env.device))
        rows = broadcast_object(self._eval_rows() if self.env.is_main else None)
        self.last_eval_step = rows[-1]["step"] if rows else None

    def _mixup_and_criterion(self):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        d = self.cfg.data
        if d.mixup > 0 or d.cutmix > 0:
            mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                          label_smoothing=d.smoothing, num_classes=self.cfg.model.num_classes)
            return mixup, SoftTargetCrossEntropy()
        if d.smoothing > 0:
            return None, LabelSmoothingCrossEntropy(smoothing=d.smoothing)
        return None, torch.nn.CrossEntropyLoss()

    # -- the step --------------------------------------------------------------------------------

    def micro_loss(self, micro: int, batch: dict):
        seed_everything(self.loop.micro_key(micro).seed_for(MIXUP_STREAM))
        num_classes = self.cfg.model.num_classes
        labels = batch["label"]  # checked on the host copy: no device sync
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(f"training labels must be in [0, {num_classes}); got {labels.min().item()}.."
                             f"{labels.max().item()}: use labelled shards (.cls) and set model.num_classes")
        labels = labels.to(self.env.device)
        imgs = normalize_on_device(batch["image"], self.env.device)
        if self.eraser is not None:
            imgs = self.eraser(imgs)
        targets = labels
        if self.mixup is not None:
            imgs, targets = self.mixup(imgs, labels)
        logits = self.loop.engine(imgs.to(self.param_dtype))
        return self.criterion(logits.float(), targets), {}

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        loop = self.loop
        if self.probe:
            sync_buffers(loop.engine.module)
        result = _evaluate(loop.engine.module, self.cfg, self.env)
        self.last_eval_step = loop.global_step
        if self.env.is_main:
            row = {"step": loop.global_step, "epoch": round(loop.global_step / loop.steps_per_epoch, 3), **result}
            loop.run_dir.append(EVALS, row)
            best = max(r["acc1"] for r in self._eval_rows())
            print(f"eval at step {loop.global_step} (epoch {row['epoch']:g}): top-1 {result['acc1']:.2f}% "
                  f"top-5 {result['acc5']:.2f}% loss {result['loss']:.4f} over {result['samples']} images "
                  f"({result['samples'] / result['seconds']:.0f} img/s) | best top-1 {best:.2f}%", flush=True)
            loop.tracker.log_metrics({"val_acc1": result["acc1"], "val_acc5": result["acc5"],
                                      "val_loss": result["loss"], "val_best_acc1": best}, step=loop.global_step)
        return result

    def _eval_rows(self) -> list[dict]:
        return self.loop.run_dir.rows(EVALS)

    def _eval_due_after_epoch(self, finished_epochs: int) -> bool:
        return finished_epochs % self.cfg.train.eval_every_epochs == 0

    # -- around the steps ------------------------------------------------------------------------

    def before_train(self) -> None:
        # A kill between an epoch's last checkpoint and its evaluation: evaluate it now.
        loop = self.loop
        at_epoch_end = loop.global_step > 0 and loop.step_in_epoch == 0
        if at_epoch_end and self._eval_due_after_epoch(loop.epoch) and self.last_eval_step != loop.global_step:
            self.evaluate()

    def after_step(self, micro_batches: list[dict]) -> None:
        pass

    def after_epoch(self, micro_batches: list[dict]) -> None:
        if self._eval_due_after_epoch(self.loop.epoch + 1) or self.loop.global_step == self.loop.end_step:
            self.evaluate()

    def after_train(self, micro_batches) -> None:
        if self.last_eval_step != self.loop.global_step:
            self.evaluate()

    def before_save(self) -> None:
        if self.probe:
            sync_buffers(self.loop.engine.module)

    def summary(self, result: dict) -> list[str]:
        """The task's lines of the report at the end."""
        lines = []
        if "best_acc1" in result:
            lines.append(f"top-1            best {result['best_acc1']:.2f}% (step {result['best_step']}), "
                         f"last {result['last_acc1']:.2f}% (top-5 {result['last_acc5']:.2f}%)")
        return lines + [f"evaluations      {result['eval_log']}"]

    def result_extra(self) -> dict:
        loop = self.loop
        rows = broadcast_object(self._eval_rows() if self.env.is_main else None) or []
        best = max(rows, key=lambda r: r["acc1"], default=None)
        last = rows[-1] if rows else None
        extra = {"mode": self.cfg.mode, "eval_log": str(loop.run_dir.file(EVALS))}
        if best:
            extra.update(best_acc1=best["acc1"], best_step=best["step"], last_acc1=last["acc1"],
                         last_acc5=last["acc5"], last_loss=last["loss"])
            if self.env.is_main:
                loop.tracker.log_metrics({"best_acc1": best["acc1"], "last_acc1": last["acc1"]}, step=loop.global_step)
        return extra


def evaluate_only(cfg, env: DistEnv) -> dict:
    """`--eval-only`: the model of `model.init` (a fine-tuned run dir, an export, a published
    fine-tuned .pth) on the validation set; prints and returns the figures. The config has been
    checked to name `model.init` (`validate_finetune`); a caller that skipped that gets the same line."""
    if not cfg.model.init:
        from mae_scale.config_load import ConfigError

        raise ConfigError("--eval-only needs model.init=... (a fine-tuned run directory or weights file)")
    torch.manual_seed(cfg.train.seed)
    model = build_classifier(cfg)
    report = load_classifier_init(model, cfg)
    untrained = [k for k in report.missing if not k.endswith("num_batches_tracked")]  # torch fills that one
    if untrained:  # a pretraining checkpoint, or a head for another class count: nothing to evaluate
        raise WeightsError(f"{cfg.model.init} has no trained {untrained[0]} for this model "
                           f"({cfg.model.num_classes} classes, global_pool={cfg.model.global_pool}); --eval-only "
                           "needs a fine-tuned or probed model: fine-tune it first, or fix model.num_classes")
    model.to(env.device)
    result = _evaluate(model, cfg, env)
    result["init"] = cfg.model.init
    result["init_report"] = report
    if env.is_main:
        print(f"eval of {cfg.model.init}: top-1 {result['acc1']:.2f}% top-5 {result['acc5']:.2f}% "
              f"loss {result['loss']:.4f} over {result['samples']} images", flush=True)
    return result
