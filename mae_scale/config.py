"""The typed config tree of a pretraining run: one dataclass per component, one docstring per field.

A run is a YAML preset (which may name a `base:` preset to inherit from) plus dotted `key=value`
overrides. Everything is checked when it is loaded, before any work starts: unknown keys, wrong
types, non-finite floats and values out of a field's declared range (`mae_scale.config_load`), the
rules between fields (here), what the machine and the data must offer (`mae_scale.config_checks`).
A bad config raises `ConfigError` whose message is one line naming the field and what is allowed;
the CLI prints it and exits with status 2. What a resume may change: `mae_scale.config_resume`
(`check_resume`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mae_scale.config_load import (ConfigError, apply_overrides, build, config_warning, deep_merge, doc,  # noqa: F401
                                   read_preset, reference_markdown as _reference_rows)

SEED_RANGE = "[0, 4294967295]"  # numpy's SeedSequence takes no negatives; uint32 is the common seed space

# The tokens and position embeddings a ViT here may hold, by the last part of the parameter's name.
TokenName = Literal["cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "dist_token", "reg_token"]
TOKEN_NAMES: tuple[str, ...] = TokenName.__args__


@dataclass
class ModelConfig:
    objective: Literal["mae", "simmim", "beit"] = doc(
        "mae", "Pretraining objective over the one ViT encoder: mae (pixels of removed patches, encoder on "
        "visible patches only), simmim (L1 on masked pixels, mask token in the encoder, linear head), beit "
        "(cross entropy on tokenizer ids of blockwise-masked patches).")
    name: str = doc("mae_vit_base_patch16", "mae: one of mae_scale.models.MODEL_NAMES; simmim / beit: an encoder "
                    "of mae_scale.models.VIT_ARCHS (vit_base_patch16, ...).")
    mask_ratio: float = doc(0.75, "Share of patches (mae) or of mask cells (simmim: 0.6) hidden.", range="(0, 1)")
    norm_pix_loss: bool = doc(True, "Regress per-patch normalized pixels (the paper's default).")
    mask_patch_size: int = doc(32, "simmim: side of a mask cell in pixels (a multiple of the patch size).",
                               range="[1, inf)")
    num_masking_patches: int = doc(75, "beit: patches masked per image, in blocks (BEiT: 75 of 196).",
                                   range="[1, inf)")
    min_block_patches: int = doc(16, "beit: smallest block of the blockwise mask, in patches.", range="[1, inf)")
    tokenizer: str = doc("", "beit: the tokenizer file, local paths only: ours (`mae-scale tokenizer fit`), a DALL-E "
                         "dVAE encoder state dict, or a BEiT v2 VQ-KD checkpoint (.safetensors / weights-only .pth).")
    layer_scale: float = doc(0.1, "simmim / beit: initial layer-scale value of every block (0: none).",
                              range="[0, inf)")
    drop_path: float = doc(0.1, "simmim / beit: stochastic depth rate during pretraining.", range="[0, 1)")
    grad_checkpointing: bool = doc(False, "Recompute block activations in backward to save memory.")
    init: str = doc("", "Start from these weights instead of random ones (continued pretraining): a published MAE "
                    ".pth, an exported .safetensors, or a mae-scale run/checkpoint dir; a resumed run ignores it.")


@dataclass
class DataConfig:
    train_shards: Union[str, list[dict]] = doc(
        "builtin",
        "WebDataset shards: a manifest.json, a shard directory (ours, or foreign shards counted from timm's "
        "_info.json, a wids index, img2dataset _stats.json or their tar headers), a wids / _info.json file, a "
        "brace pattern, or `builtin` (a small set of real photos made from packaged images, for smoke runs); "
        "or a weighted mix: a list of {shards: ..., weight: W, name: optional} (epochs of data.epoch_samples, "
        "default the sum of the sources' sizes).",
    )
    val_shards: str = doc("", "Held-out shards for monitor.every_steps: the objective's loss on their first "
                          "monitor.val_samples samples, with center crops and fixed masks.")
    image_key: str = doc("jpg;jpeg;png;webp;bmp;tif;tiff;gif;ppm",
                         "Tar member extensions that hold the image, ';'-separated, matched on the whole extension "
                         "after the key (`input.jpg` takes KEY.input.jpg); the first present wins.")
    label_key: str = doc("cls", "Member holding the label: an extension (`cls`: an ASCII integer) or EXT:FIELD for a "
                         "field of a JSON member (`json:label`); missing or negative: unlabelled.")
    input_size: int = doc(224, "Side of the square crop fed to the model, in pixels (a multiple of the patch size).",
                           range="[1, inf)")
    crop_scale_min: float = doc(0.2, "Smallest RandomResizedCrop area share (the paper: 0.2).", range="(0, 1]")
    num_workers: int = doc(8, "Decode/augment worker processes per rank (0 = in the main process).",
                           range="[0, inf)")
    max_bad_fraction: float = doc(0.01, "Stop with an error when more than this share of samples is unreadable.",
                                   range="[0, 1]")
    cache_dir: str = doc("", "Where `builtin` data is made (default: ~/.cache/mae-scale).")
    resampled: bool = doc(False, "Draw samples with replacement (random shards); epochs of `epoch_samples` samples.")
    epoch_samples: Optional[int] = doc(None, "Samples per epoch over all ranks in resampled mode or for a mix of "
                                        "sources (None: the data set's size, or the sum of the sources').",
                                        range="[1, inf)")
    decode_device: str = doc(
        "cpu", "Where JPEGs are decoded: `cpu` (in the workers), `cuda` (batched nvJPEG on the GPU, for when "
        "the CPU cores cannot keep up), or `cpu-batched` (the same batched path on the CPU).")


@dataclass
class OptimConfig:
    blr: float = doc(1.5e-4, "Base learning rate; lr = blr x global_batch_size / 256.", range="(0, inf)")
    lr: Optional[float] = doc(None, "Absolute peak learning rate; overrides blr when set.", range="(0, inf)")
    min_lr: float = doc(0.0, "Learning rate at the end of the cosine (at most the peak).", range="[0, inf)")
    weight_decay: float = doc(0.05, "AdamW weight decay (never on biases and norm weights; tokens: "
                               "`optim.no_weight_decay`).", range="[0, inf)")
    no_weight_decay: list[TokenName] = doc(
        [], "Tokens and position embeddings spared weight decay; the others are decayed like any matrix. "
        "[]: the official MAE script (cls_token and mask_token decayed); the official SimMIM and BEiT "
        "scripts spare [cls_token, pos_embed]; this project's earlier rule spared every one "
        "([cls_token, mask_token, pos_embed, decoder_pos_embed, dist_token, reg_token]). Frozen sin-cos "
        "embeddings are not trained either way.")
    betas: list[float] = doc([0.9, 0.95], "AdamW betas (two numbers).", range="[0, 1)")
    clip_grad: Optional[float] = doc(None, "Clip the global gradient norm to this value (None: no clipping).",
                                      range="(0, inf)")


@dataclass
class TrainConfig:
    global_batch_size: int = doc(4096, "Images per optimizer step across all ranks (effective batch).",
                                 range="[1, inf)")
    micro_batch_size: int = doc(64, "Images per rank per forward/backward.", range="[1, inf)")
    grad_accum_steps: Optional[int] = doc(
        None, "Micro-batches per optimizer step; derived from the batch sizes and world size when None.",
        range="[1, inf)")
    epochs: int = doc(800, "Length of the schedule in epochs.", range="[1, inf)")
    warmup_epochs: float = doc(40, "Linear warmup, in epochs, before the half-cycle cosine (at most train.epochs).",
                                range="[0, inf)")
    max_steps: Optional[int] = doc(None, "Stop after this many optimizer steps (the schedule still spans `epochs`).",
                                    range="[1, inf)")
    precision: Literal["bf16", "fp32"] = doc("bf16", "Parameter and activation precision.")
    zero_stage: Literal[0, 1, 2, 3] = doc(1, "DeepSpeed ZeRO stage.")
    seed: int = doc(0, "Seed for weights, data order, augmentation and masks.", range=SEED_RANGE)
    log_every_steps: int = doc(20, "Print and log metrics every this many optimizer steps.", range="[1, inf)")
    compile: Optional[bool] = doc(
        None, "torch.compile every transformer block in place (parameter names and checkpoints unchanged). "
        "null: on for CUDA at ZeRO 0-2; off on a CPU (compiling takes longer than short CPU runs) and at ZeRO-3.")
    prefetch: bool = doc(True, "Copy the next batch to the device (pinned host memory, non-blocking, on a side "
                         "stream on CUDA) while the current step runs.")
    peak_tflops: Optional[float] = doc(
        None, "Peak dense bf16 TFLOP/s of one device, for MFU; null: looked up from the GPU's name (H100/H200, "
        "A100, L40S, ...); MFU is left out on a CPU unless this is set.", range="(0, inf)")


@dataclass
class CheckpointConfig:
    every_steps: int = doc(1000, "Save a checkpoint every this many optimizer steps (and always at the end).",
                            range="[1, inf)")
    keep_last: int = doc(2, "Complete checkpoints kept, at least 2 (the newest may be damaged on disk: the one "
                          "before is the fallback); older ones are deleted.", range="[2, inf)")
    signal_grace_s: float = doc(25.0, "On SIGTERM / SIGINT: save a checkpoint at the end of the step under way "
                                "if the last save took no longer than this, then stop (SLURM sends SIGKILL 30 s "
                                "after SIGTERM unless its KillWait says otherwise).", range="[0, inf)")


@dataclass
class TrackingConfig:
    enabled: bool = doc(True, "Record the run in MLflow (rank 0 only).")
    tracking_uri: str = doc(
        "", "MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite in the output directory's parent."
    )
    experiment: str = doc("mae-scale", "MLflow experiment name.")
    run_name: str = doc("", "MLflow run name (default: the output directory's name).")
    image_every_steps: int = doc(0, "Log a reconstruction picture every this many steps (0: at each epoch end).",
                                  range="[0, inf)")
    system_metrics: bool = doc(False, "Also record MLflow system metrics (CPU / GPU utilization, memory, every "
                               "10 s) with the run.")


@dataclass
class MonitorConfig:
    every_steps: int = doc(0, "Every this many steps (and before the first, and at the end): the objective's loss on a fixed held-out "
                           "subset of data.val_shards (0: off).", range="[0, inf)")
    val_samples: int = doc(2048, "Held-out samples (the first ones of data.val_shards), shared by the ranks.",
                           range="[1, inf)")
    knn_every_steps: int = doc(0, "Every this many steps (and before the first, and at the end): weighted k-NN top-1/top-5 of the encoder's "
                               "features (cls token and mean-pooled) on labelled shards (0: off).", range="[0, inf)")
    knn_train_shards: str = doc("", "Labelled shards the k-NN bank is made of (their first knn_train_samples).")
    knn_val_shards: str = doc("", "Labelled shards the k-NN is scored on (their first knn_val_samples). Empty: "
                              "knn_train_shards is split, its first knn_val_samples the queries, the bank after them.")
    knn_train_samples: int = doc(10000, "Bank size.", range="[1, inf)")
    knn_val_samples: int = doc(2000, "Query samples.", range="[1, inf)")
    knn_k: int = doc(20, "Neighbours that vote (DINO: 20).", range="[1, inf)")
    knn_temperature: float = doc(0.07, "Vote weight exp(similarity / T) (DINO: 0.07).", range="(0, inf)")
    batch_size: int = doc(64, "Images per forward of the monitor, per rank.", range="[1, inf)")


@dataclass
class PretrainConfig:
    output_dir: str = doc("runs/mae", "Run directory: config, checkpoints, pictures. Re-using it resumes the run.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    deepspeed: dict = doc({}, "Raw DeepSpeed config merged on top of the generated one (expert use).")


# ---------------------------------------------------------------------------------------------
# Loading: YAML (with `base:` inheritance) + dotted overrides -> typed tree -> validation.
# The generic part (YAML, types, finite floats, each field's range) is mae_scale.config_load; the
# rules between fields and against this machine are here and in mae_scale.config_checks.

Scope = Literal["run", "submit", "plan"]
SCOPES = ("run", "submit", "plan")


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), cls: type | None = None,
                check: Any = None, scope: Scope = "run") -> Any:
    """Preset + overrides -> a validated config of type `cls` (default PretrainConfig) checked by
    `check(cfg, scope)` (default `validate`); raises ConfigError. `scope` says where the config is
    checked: `run` (it runs on this machine: everything), `submit` (it runs elsewhere, e.g. a SLURM
    job: all but this machine's devices), `plan` (nothing is read or written: the config alone)."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not one of {SCOPES}")
    cls = cls or PretrainConfig
    data = read_preset(path) if path else {}
    data = apply_overrides(data, list(overrides), cls)
    cfg = build(cls, data)
    (check or validate)(cfg, scope)
    return cfg


def validate(cfg: PretrainConfig, scope: Scope = "run") -> None:
    """Every rule between fields, then what this machine must have (see `load_config`'s scope);
    `check_batch_layout` runs once the world size is known."""
    from mae_scale import config_checks as checks

    from mae_scale.objectives import OBJECTIVES

    m, d = cfg.model, cfg.data
    objective = OBJECTIVES[m.objective]
    patch = checks.check_input_size(d.input_size, objective.encoder_arch(m.name).patch_size, f"model.name={m.name}")
    objective.check(cfg, patch)
    checks.check_objective_fields(cfg)
    if m.init and not Path(m.init).exists():
        raise ConfigError(f"model.init={m.init!r} does not exist; point it at a .pth/.safetensors file or a run directory")
    mixed = not isinstance(d.train_shards, str)
    if d.epoch_samples is not None and not d.resampled and not mixed:
        raise ConfigError(f"data.epoch_samples={d.epoch_samples} needs data.resampled=true or a mix of sources in "
                          "data.train_shards (or set it to null)")
    checks.check_sample_keys(d.image_key, d.label_key)
    _check_monitor(cfg, here=scope != "plan")
    validate_training(cfg)
    checks.check_decode_device(d.decode_device, here=scope == "run")
    if scope != "plan":
        checks.check_output_dir(cfg.output_dir)
        if d.cache_dir or d.train_shards == "builtin":
            checks.check_writable_dir("data.cache_dir", d.cache_dir or str(Path.home() / ".cache" / "mae-scale"))
        # remote shards need counts (an index) unless resampled with a given epoch length
        size = checks.check_mix("data.train_shards", d.train_shards,
                                hint="shards written by `mae-scale make-shards`, or use `builtin`",
                                resampled=d.resampled and (mixed or d.epoch_samples is not None))
        checks.check_epoch_holds_a_batch("data.train_shards",
                                         d.epoch_samples if (d.resampled or mixed) and d.epoch_samples else size,
                                         cfg.train.global_batch_size)


def _check_monitor(cfg: PretrainConfig, here: bool) -> None:
    """The monitor's shards are named when it is on (and exist, where the run will read them)."""
    from mae_scale import config_checks as checks

    mon, d = cfg.monitor, cfg.data
    needed = [("data.val_shards", d.val_shards, "monitor.every_steps", mon.every_steps),
              ("monitor.knn_train_shards", mon.knn_train_shards, "monitor.knn_every_steps", mon.knn_every_steps)]
    if mon.knn_val_shards:  # else knn_train_shards is split into queries and bank
        needed.append(("monitor.knn_val_shards", mon.knn_val_shards, "monitor.knn_every_steps", mon.knn_every_steps))
    sizes = {}
    for key, spec, switch, every in needed:
        if every and not spec:
            raise ConfigError(f"{switch}={every} needs {key}: point it at shards (or set {switch}=0)")
        if every and here:
            sizes[key] = checks.check_shards(key, spec, hint="shards written by `mae-scale make-shards`")
    split_size = None if mon.knn_val_shards else sizes.get("monitor.knn_train_shards")
    if split_size is not None and split_size <= mon.knn_val_samples:
        raise ConfigError(f"monitor.knn_train_shards holds {split_size} samples, all of them k-NN queries "
                          f"(monitor.knn_val_samples={mon.knn_val_samples}) when monitor.knn_val_shards is "
                          "empty; the bank is what follows them: lower knn_val_samples or name knn_val_shards")


def validate_training(cfg: Any) -> None:
    """The rules between fields every run shares (pretraining, fine-tuning, probing): batch layout,
    schedule, optimizer numbers, the raw DeepSpeed dict. Signs and ranges are the fields' own."""
    from mae_scale import config_checks as checks

    o, t = cfg.optim, cfg.train
    if t.warmup_epochs > t.epochs:
        raise ConfigError(f"train.warmup_epochs={t.warmup_epochs} must be between 0 and train.epochs={t.epochs}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if t.grad_accum_steps is not None and t.global_batch_size % (t.micro_batch_size * t.grad_accum_steps):
        raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} does not fit: train.global_batch_size="
                          f"{t.global_batch_size} is not a multiple of micro-batch {t.micro_batch_size} x "
                          f"{t.grad_accum_steps}; set it to null (derived from the world size) or make it divide")
    if o.min_lr > peak_lr(cfg):
        raise ConfigError(f"optim.min_lr={o.min_lr} is above the peak learning rate {peak_lr(cfg):g} (optim.lr, or "
                          "optim.blr x global batch / 256): the cosine would rise; lower optim.min_lr")
    checks.check_deepspeed(cfg)


def check_batch_layout(cfg: PretrainConfig, world_size: int) -> int:
    """The gradient-accumulation steps for this world size; refuses layouts that do not divide."""
    t = cfg.train
    per_step = world_size * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by world size {world_size} x "
            f"train.micro_batch_size={t.micro_batch_size} = {per_step}; pick a micro-batch that divides "
            f"{t.global_batch_size // world_size if t.global_batch_size % world_size == 0 else 'it'}")
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise ConfigError(
            f"train.grad_accum_steps={t.grad_accum_steps} does not fit: global batch {t.global_batch_size} = "
            f"world size {world_size} x micro-batch {t.micro_batch_size} x {accum}; set it to {accum} or null")
    return accum


def peak_lr(cfg: PretrainConfig) -> float:
    """lr = blr x global batch / 256 (the MAE scaling rule) unless an absolute lr is given."""
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * cfg.train.global_batch_size / 256


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(data: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form logged to MLflow as params."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def reference_markdown(cls: type = PretrainConfig) -> list[str]:
    """One markdown table row per field (type, range, default, meaning): the README's config
    reference is generated from this."""
    return _reference_rows(cls)

