"""What a resume may change: the run directory's saved `config.yaml` against the config of the new start.

Every leaf key of both config trees is in exactly one of three classes (a test keeps it so):

- SAFE: how the run is carried out, not what it computes; taken silently (and listed for the log).
  output_dir (a moved run directory), model.init (read only by a fresh run), model.grad_checkpointing
  (recomputation: the same numbers), train.max_steps, train.log_every_steps, train.compile,
  train.prefetch, train.peak_tflops, train.micro_batch_size and train.grad_accum_steps (the memory
  layout of the same global batch, as a world-size change is), train.eval_every_epochs,
  checkpoint.every_steps, checkpoint.keep_last, data.num_workers, data.max_bad_fraction,
  data.decode_device (the same crops), data.cache_dir, data.eval_batch_size, tracking.*.
  Like a world-size change, a new micro-batch or worker count re-splits the epoch in progress,
  which may then repeat or miss a few samples.
- ACCEPT: changes the rest of the run, and the checkpoint can take it because the trainer applies
  the new value at every step (learning-rate schedule, clipping, masks, augmentation, data):
  refused in one line naming each key with old -> new unless the caller passes accept=True
  (`--accept-config-change`). data.image_key / data.label_key are here with data.train_shards: which
  member is the image or the label changes the data, as new shards would. train.epochs is here, not in SAFE: the cosine spans train.epochs,
  so a longer schedule moves the learning rate of the step being resumed.
- REFUSE: the checkpoint cannot take it, even with the switch: shapes of the weights (model.name /
  arch, data.input_size, num_classes, global_pool, layer_scale, tokenizer), what is trained
  (objective, mode), train.precision and train.zero_stage (how the weights and optimizer state are
  stored), train.global_batch_size (the position in the epoch is counted in global batches), and
  optimizer settings that live in the checkpoint's optimizer state (optim.name, betas, weight_decay,
  no_weight_decay, layer_decay, momentum: torch restores the param-group values on load, so a new one
  would silently not apply; a new no_weight_decay moves parameters between the groups). The world
  size is not in the config: a checkpoint is resharded to any world size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from mae_scale.config_load import ConfigError, default_of, leaf_fields

SAFE = {
    "output_dir", "model.init", "model.grad_checkpointing",
    "train.max_steps", "train.log_every_steps", "train.compile", "train.prefetch", "train.peak_tflops",
    "train.micro_batch_size", "train.grad_accum_steps", "train.eval_every_epochs",
    "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.signal_grace_s",
    "data.num_workers", "data.max_bad_fraction", "data.decode_device", "data.cache_dir", "data.eval_batch_size",
    "tracking.*", "monitor.*",
}
ACCEPT = {
    "optim.blr", "optim.lr", "optim.min_lr", "optim.clip_grad", "train.epochs", "train.warmup_epochs", "train.seed",
    "model.mask_ratio", "model.norm_pix_loss", "model.mask_patch_size", "model.num_masking_patches",
    "model.min_block_patches", "model.drop_path",
    "data.train_shards", "data.val_shards", "data.crop_scale_min", "data.resampled", "data.epoch_samples",
    "data.image_key", "data.label_key", "data.auto_augment", "data.reprob", "data.mixup", "data.cutmix", "data.smoothing", "data.eval_crop_pct",
    "deepspeed",
}
REFUSE = {
    "mode", "model.objective", "model.name", "model.arch", "model.num_classes", "model.global_pool",
    "model.layer_scale", "model.tokenizer", "data.input_size", "train.precision", "train.zero_stage",
    "train.global_batch_size", "optim.name", "optim.betas", "optim.weight_decay", "optim.no_weight_decay",
    "optim.layer_decay", "optim.momentum",
}
# What a run whose saved config predates a key did, where that is not the key's default today: runs
# before optim.no_weight_decay spared every token and position embedding from weight decay.
PREDATES = {"optim.no_weight_decay": ["cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "dist_token",
                                      "reg_token"]}


class ResumeChanges(NamedTuple):
    """Each a list of "key: old -> new"."""

    safe: list[str]
    accept: list[str]
    refuse: list[str]


def resume_class(key: str) -> str:
    """"safe", "accept" or "refuse" for a dotted key (unlisted keys are refused: the safe default)."""
    for name, keys in (("safe", SAFE), ("accept", ACCEPT), ("refuse", REFUSE)):
        if key in keys or f"{key.split('.')[0]}.*" in keys:
            return name
    return "refuse"


def _tree(kind: str) -> type:
    if kind == "pretrain":
        from mae_scale.config import PretrainConfig

        return PretrainConfig
    if kind in ("finetune", "linprobe"):
        from mae_scale.finetune_config import FinetuneConfig

        return FinetuneConfig
    raise ValueError(f"kind {kind!r} is not pretrain, finetune or linprobe")


def _value(data: dict, key: str, default: Any) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default  # a key the saved config predates: that run had `default` (see PREDATES)
        node = node[part]
    return node


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."  # room for a whole list to put back


def resume_changes(saved: dict, new: Any, kind: str = "pretrain") -> ResumeChanges:
    """Compare a run directory's saved config (the mapping `save_config` wrote) with the new config
    (a config tree or its `to_dict`), key by key over the tree of `kind` (pretrain, finetune or
    linprobe). Keys the saved config has but the tree no longer has cannot act on the run: skipped."""
    if dataclasses.is_dataclass(new):
        new = dataclasses.asdict(new)
    out = ResumeChanges([], [], [])
    for key, f, _ in leaf_fields(_tree(kind)):
        default = default_of(f)
        old, now = _value(saved, key, PREDATES.get(key, default)), _value(new, key, default)
        if old == now and type(old) is type(now) or _same_number(old, now):
            continue
        getattr(out, resume_class(key)).append(f"{key}: {_show(old)} -> {_show(now)}")
    return out


def _same_number(a: Any, b: Any) -> bool:
    """40 and 40.0 (YAML writes a float field's whole value either way) are one value; True is not 1."""
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and a == b)


def check_resume(saved: dict, new: Any, kind: str = "pretrain", accept: bool = False) -> list[str]:
    """Refuse (ConfigError, one line) a resume that would change what the checkpoint cannot take, or,
    without `accept`, what changes the rest of the run; return the changes that are taken."""
    changes = resume_changes(saved, new, kind)
    if changes.refuse:
        raise ConfigError(f"resuming this run directory would change what its checkpoint cannot take: "
                          f"{'; '.join(changes.refuse)}; put it back, or start a new run in another output_dir")
    if changes.accept and not accept:
        raise ConfigError(f"resuming this run directory would change the run: {'; '.join(changes.accept)}; "
                          "pass --accept-config-change to take it, or put it back")
    return changes.safe + changes.accept
