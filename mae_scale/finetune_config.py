"""The typed config tree of fine-tuning and linear-probing runs (`mae-scale finetune`, `linprobe`).

Same loading rules as pretraining (`mae_scale.config`: YAML preset with `base:`, dotted overrides,
one-line refusals before any work); the train / checkpoint / tracking sections are the pretraining
ones, so batch layout, schedule, checkpoints and MLflow behave identically. Defaults are MAE's
ViT-B fine-tuning recipe (arXiv 2111.06377, appendix A.2, table 9); the presets in
configs/finetune/ and configs/linprobe/ hold the per-size recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from mae_scale.config import (CheckpointConfig, ConfigError, Scope, TrackingConfig, TrainConfig, doc, load_config,
                              read_preset, validate_training)


@dataclass
class ClassifierConfig:
    arch: str = doc("vit_base_patch16", "Encoder: one of mae_scale.models.VIT_ARCHS (vit_base_patch16, ...).")
    num_classes: int = doc(1000, "Classes of the labelled data (ImageNet: 1000).", range="[1, inf)")
    init: str = doc("", "Initial encoder: a mae-scale pretraining run/checkpoint dir, an exported .safetensors, "
                    "or a published MAE .pth; empty: random initialization.")
    drop_path: float = doc(0.1, "Stochastic depth rate (MAE: 0.1 ViT-B, 0.2 ViT-L, 0.3 ViT-H).", range="[0, 1)")
    global_pool: Literal["avg", "token"] = doc(
        "avg", "avg: mean of the patch tokens then fc_norm (MAE fine-tuning); token: the cls token after "
        "the final norm (MAE linear probing).")
    grad_checkpointing: bool = doc(False, "Recompute block activations in backward to save memory.")
    layer_scale: Optional[float] = doc(None, "Layer scale of the blocks (None: none); set it (0.1) for encoders "
                                       "pretrained with simmim or beit, whose blocks carry layer-scale weights.",
                                       range="[0, inf)")


@dataclass
class FinetuneDataConfig:
    train_shards: str = doc("", "Labelled WebDataset shards (`.cls` labels) to train on.")
    val_shards: str = doc("", "Labelled shards to evaluate on (every sample counted once over all ranks).")
    image_key: str = doc("jpg;jpeg;png;webp;bmp;tif;tiff;gif;ppm",
                         "Tar member extensions that hold the image, ';'-separated, matched on the whole extension "
                         "after the key (`input.jpg` takes KEY.input.jpg); the first present wins.")
    label_key: str = doc("cls", "Member holding the label: an extension (`cls`: an ASCII integer) or EXT:FIELD for a "
                         "field of a JSON member (`json:label`); missing or negative: unlabelled.")
    input_size: int = doc(224, "Side of the square crop fed to the model (a multiple of the patch size); position "
                          "embeddings of `model.init` are interpolated when it differs from the pretraining size.",
                          range="[1, inf)")
    crop_scale_min: float = doc(0.08, "Smallest RandomResizedCrop area share of the train transform.", range="(0, 1]")
    auto_augment: str = doc("rand-m9-mstd0.5-inc1", "timm RandAugment policy of the train transform; empty: none.")
    reprob: float = doc(0.25, "Random erasing probability (timm RandomErasing, per image, pixel mode).", range="[0, 1)")
    mixup: float = doc(0.8, "Mixup alpha (timm Mixup); 0 with cutmix 0 turns mixing off.", range="[0, inf)")
    cutmix: float = doc(1.0, "CutMix alpha (timm Mixup switches between the two with probability 0.5).",
                         range="[0, inf)")
    smoothing: float = doc(0.1, "Label smoothing.", range="[0, 1)")
    eval_crop_pct: float = doc(0.875, "Evaluation: resize the short side to input_size / eval_crop_pct, "
                               "then center-crop input_size (224: 256 then 224).", range="(0, 1]")
    eval_batch_size: int = doc(64, "Images per rank per evaluation forward.", range="[1, inf)")
    num_workers: int = doc(8, "Decode/augment worker processes per rank (0 = in the main process).",
                           range="[0, inf)")
    max_bad_fraction: float = doc(0.01, "Stop with an error when more than this share of samples is unreadable.",
                                   range="[0, 1]")


@dataclass
class FinetuneOptimConfig:
    name: Literal["adamw", "lars", "sgd"] = doc("adamw", "adamw (fine-tuning), lars or sgd (linear probing).")
    blr: float = doc(5e-4, "Base learning rate; lr = blr x global_batch_size / 256.", range="(0, inf)")
    lr: Optional[float] = doc(None, "Absolute peak learning rate; overrides blr when set.", range="(0, inf)")
    min_lr: float = doc(1e-6, "Learning rate at the end of the cosine (at most the peak).", range="[0, inf)")
    weight_decay: float = doc(0.05, "Weight decay (never on biases, norms, tokens, position embeddings).",
                              range="[0, inf)")
    layer_decay: float = doc(0.65, "Layer-wise LR decay: block i gets lr x decay^(depth - i) (1.0: off).",
                             range="(0, 1]")
    betas: list[float] = doc([0.9, 0.999], "AdamW betas (two numbers).", range="[0, 1)")
    momentum: float = doc(0.9, "Momentum of lars / sgd.", range="[0, 1)")
    clip_grad: Optional[float] = doc(None, "Clip the global gradient norm to this value (None: no clipping).",
                                     range="(0, inf)")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    global_batch_size: int = doc(1024, "Images per optimizer step across all ranks (effective batch).",
                                 range="[1, inf)")
    micro_batch_size: int = doc(32, "Images per rank per forward/backward.", range="[1, inf)")
    epochs: int = doc(100, "Length of the schedule in epochs.", range="[1, inf)")
    warmup_epochs: float = doc(5, "Linear warmup, in epochs, before the half-cycle cosine (at most train.epochs).",
                               range="[0, inf)")
    eval_every_epochs: int = doc(1, "Evaluate every this many epochs (and always at the end).", range="[1, inf)")


@dataclass
class FinetuneConfig:
    mode: Literal["finetune", "linprobe"] = doc(
        "finetune", "finetune: train everything with layer-wise LR decay; linprobe: frozen encoder, "
        "BatchNorm (no affine) + linear head. Set by the verb.")
    output_dir: str = doc("runs/finetune", "Run directory: config, checkpoints, eval.jsonl. Re-using it resumes.")
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: dict = doc({}, "Raw DeepSpeed config merged on top of the generated one (expert use).")


def _manifest_classes(spec: str) -> Optional[int]:
    """The class count the shards' manifest records, or None where no manifest speaks for them
    (remote or piped shards, a brace pattern naming tars the folder's manifest does not list, a
    folder written by other tools): then labels are checked per batch."""
    from braceexpand import braceexpand

    from data_pipeline.shards import MANIFEST_NAME, read_manifest

    if "://" in spec or spec.startswith("pipe:"):
        return None
    names = None
    if "{" in spec:
        tars = [Path(u) for u in braceexpand(spec)]
        if len({t.parent for t in tars}) != 1:
            return None
        p, names = tars[0].parent / MANIFEST_NAME, {t.name for t in tars}
    else:
        p = Path(spec)
        p = p / MANIFEST_NAME if p.is_dir() else p
    if p.suffix != ".json" or not p.is_file():
        return None
    try:
        m = read_manifest(p)
        if names is not None and not names <= {s["name"] for s in m["shards"]}:
            return None
        if m.get("source") == "index":  # written by `data index` for foreign shards: classes unknown
            return None
        return int(m["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def validate_finetune(cfg: FinetuneConfig, eval_only: bool = False, scope: Scope = "run") -> None:
    """The rules between fields, then what this machine must have (`scope` as in `load_config`);
    with `eval_only` the train shards are not needed."""
    from mae_scale import config_checks as checks
    from mae_scale.models import VIT_ARCHS

    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if eval_only and not m.init:  # here, before any process group starts
        raise ConfigError("--eval-only needs model.init=... (a fine-tuned run directory or weights file)")
    if m.arch not in VIT_ARCHS:
        raise ConfigError(f"model.arch={m.arch!r} is unknown; use one of {', '.join(VIT_ARCHS)}")
    checks.check_input_size(d.input_size, VIT_ARCHS[m.arch].patch_size, f"model.arch={m.arch}")
    if m.init and not Path(m.init).exists():
        raise ConfigError(f"model.init={m.init!r} does not exist; point it at a pretraining run directory, "
                          "an exported .safetensors or a published MAE .pth (or leave it empty for random init)")
    if (d.mixup > 0 or d.cutmix > 0) and t.micro_batch_size % 2:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must be even with mixup/cutmix on "
                          "(timm's Mixup pairs each image with the batch flipped)")
    validate_training(cfg)
    if cfg.mode == "linprobe" and o.name == "adamw" and o.layer_decay != 1.0:
        raise ConfigError("linear probing trains only the head: set optim.layer_decay=1.0 (or use optim.name=lars)")
    checks.check_unused_fields("optim", o, {"betas": ("adamw",), "momentum": ("lars", "sgd")}, o.name, "optim.name")
    if scope == "plan":
        return
    checks.check_output_dir(cfg.output_dir)
    checks.check_sample_keys(d.image_key, d.label_key)
    keys = ("val_shards",) if eval_only else ("train_shards", "val_shards")
    samples = {}
    for key in keys:  # both exist and read before any is sized: the first message names what is missing
        spec = getattr(d, key)
        if spec == "builtin":
            raise ConfigError(f"data.{key}=builtin is for pretraining smoke runs; point it at labelled shards, e.g. "
                              "from `mae-scale data fashion-mnist OUT` or `mae-scale make-shards IMAGENET_DIR OUT`")
        samples[key] = checks.check_shards(f"data.{key}", spec, hint="labelled shards, e.g. from `mae-scale data "
                                           "fashion-mnist OUT` or `mae-scale make-shards IMAGENET_DIR OUT`")
    for key in keys:
        spec = getattr(d, key)
        classes = _manifest_classes(spec)
        if classes == 0:
            raise ConfigError(f"data.{key}={spec!r} holds unlabelled shards (its manifest has no classes); "
                              "write them from a class-per-folder tree or a file list with labels")
        if classes is not None and classes > m.num_classes:
            raise ConfigError(f"data.{key}={spec!r} has {classes} classes but model.num_classes={m.num_classes}; "
                              f"set model.num_classes={classes}")
        checks.check_epoch_holds_a_batch(f"data.{key}", samples[key], t.global_batch_size if key == "train_shards" else 1)


def load_finetune_config(path, overrides=(), mode: Optional[str] = None, eval_only: bool = False,
                         scope: Scope = "run") -> FinetuneConfig:
    """Preset + overrides (+ the verb's mode) -> a validated FinetuneConfig (raises ConfigError);
    `scope` as in `mae_scale.config.load_config`."""
    overrides = list(overrides)
    if mode is not None:
        preset_mode = (read_preset(path) if path else {}).get("mode", mode)
        if preset_mode != mode:
            raise ConfigError(f"{path} is a {preset_mode} preset; run `mae-scale {preset_mode}` with it, "
                              f"or pick a preset from configs/{mode}/")
        overrides.append(f"mode={mode}")
    return load_config(path, overrides, cls=FinetuneConfig, scope=scope,
                       check=lambda cfg, scope: validate_finetune(cfg, eval_only, scope))
