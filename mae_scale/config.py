"""The typed config tree of a pretraining run: one dataclass per component, one docstring per field.

A run is a YAML preset (which may name a `base:` preset to inherit from) plus dotted `key=value`
overrides. Everything is checked when it is loaded, before any work starts: unknown keys, wrong
types, values out of range. A bad config raises `ConfigError` whose message is one line naming
the field and what is allowed; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the message is one line meant for the user."""


def doc(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its docstring kept in metadata (used for validation messages and the
    generated config reference)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    objective: Literal["mae", "simmim", "beit"] = doc(
        "mae", "Pretraining objective over the one ViT encoder: mae (pixels of removed patches, encoder on "
        "visible patches only), simmim (L1 on masked pixels, mask token in the encoder, linear head), beit "
        "(cross entropy on tokenizer ids of blockwise-masked patches).")
    name: str = doc("mae_vit_base_patch16", "mae: one of mae_scale.models.MODEL_NAMES; simmim / beit: an encoder "
                    "of mae_scale.models.VIT_ARCHS (vit_base_patch16, ...).")
    mask_ratio: float = doc(0.75, "Share of patches (mae) or of mask cells (simmim: 0.6) hidden, in (0, 1).")
    norm_pix_loss: bool = doc(True, "Regress per-patch normalized pixels (the paper's default).")
    mask_patch_size: int = doc(32, "simmim: side of a mask cell in pixels (a multiple of the patch size).")
    num_masking_patches: int = doc(75, "beit: patches masked per image, in blocks (BEiT: 75 of 196).")
    min_block_patches: int = doc(16, "beit: smallest block of the blockwise mask, in patches.")
    tokenizer: str = doc("", "beit: the tokenizer file, local paths only: ours (`mae-scale tokenizer fit`), a DALL-E "
                         "dVAE encoder state dict, or a BEiT v2 VQ-KD checkpoint (.safetensors / weights-only .pth).")
    layer_scale: float = doc(0.1, "simmim / beit: initial layer-scale value of every block (0: none).")
    drop_path: float = doc(0.1, "simmim / beit: stochastic depth rate during pretraining.")
    grad_checkpointing: bool = doc(False, "Recompute block activations in backward to save memory.")
    init: str = doc("", "Start from these weights instead of random ones (continued pretraining): a published MAE "
                    ".pth, an exported .safetensors, or a mae-scale run/checkpoint dir; a resumed run ignores it.")


@dataclass
class DataConfig:
    train_shards: str = doc(
        "builtin",
        "WebDataset shards: a manifest.json, a shard directory, a brace pattern, or `builtin` "
        "(a small set of real photos made from packaged images, for smoke runs).",
    )
    input_size: int = doc(224, "Side of the square crop fed to the model, in pixels.")
    crop_scale_min: float = doc(0.2, "Smallest RandomResizedCrop area share (the paper: 0.2).")
    num_workers: int = doc(8, "Decode/augment worker processes per rank (0 = in the main process).")
    max_bad_fraction: float = doc(0.01, "Stop with an error when more than this share of samples is unreadable.")
    cache_dir: str = doc("", "Where `builtin` data is made (default: ~/.cache/mae-scale).")
    resampled: bool = doc(False, "Draw samples with replacement (random shards); epochs of `epoch_samples` samples.")
    epoch_samples: Optional[int] = doc(None, "Samples per epoch over all ranks in resampled mode (None: the data set's size).")
    decode_device: str = doc(
        "cpu", "Where JPEGs are decoded: `cpu` (in the workers), `cuda` (batched nvJPEG on the GPU, for when "
        "the CPU cores cannot keep up), or `cpu-batched` (the same batched path on the CPU).")


@dataclass
class OptimConfig:
    blr: float = doc(1.5e-4, "Base learning rate; lr = blr x global_batch_size / 256.")
    lr: Optional[float] = doc(None, "Absolute peak learning rate; overrides blr when set.")
    min_lr: float = doc(0.0, "Learning rate at the end of the cosine.")
    weight_decay: float = doc(0.05, "AdamW weight decay (never on biases, norms, tokens, position embeddings).")
    betas: list = doc([0.9, 0.95], "AdamW betas.")
    clip_grad: Optional[float] = doc(None, "Clip the global gradient norm to this value (None: no clipping).")


@dataclass
class TrainConfig:
    global_batch_size: int = doc(4096, "Images per optimizer step across all ranks (effective batch).")
    micro_batch_size: int = doc(64, "Images per rank per forward/backward.")
    grad_accum_steps: Optional[int] = doc(
        None, "Micro-batches per optimizer step; derived from the batch sizes and world size when None."
    )
    epochs: int = doc(800, "Length of the schedule in epochs.")
    warmup_epochs: float = doc(40, "Linear warmup, in epochs, before the half-cycle cosine.")
    max_steps: Optional[int] = doc(None, "Stop after this many optimizer steps (the schedule still spans `epochs`).")
    precision: Literal["bf16", "fp32"] = doc("bf16", "Parameter and activation precision.")
    zero_stage: Literal[0, 1, 2, 3] = doc(1, "DeepSpeed ZeRO stage.")
    seed: int = doc(0, "Seed for weights, data order, augmentation and masks.")
    log_every_steps: int = doc(20, "Print and log metrics every this many optimizer steps.")
    compile: Optional[bool] = doc(
        None, "torch.compile every transformer block in place (parameter names and checkpoints unchanged). "
        "null: on for CUDA at ZeRO 0-2; off on a CPU (compiling costs minutes there) and at ZeRO-3.")
    prefetch: bool = doc(True, "Copy the next batch to the device (pinned host memory, non-blocking, on a side "
                         "stream on CUDA) while the current step runs.")
    peak_tflops: Optional[float] = doc(
        None, "Peak dense bf16 TFLOP/s of one device, for MFU; null: looked up from the GPU's name (H100/H200, "
        "A100, L40S, ...); MFU is left out on a CPU unless this is set.")


@dataclass
class CheckpointConfig:
    every_steps: int = doc(1000, "Save a checkpoint every this many optimizer steps (and always at the end).")
    keep_last: int = doc(2, "Complete checkpoints kept; older ones are deleted.")


@dataclass
class TrackingConfig:
    enabled: bool = doc(True, "Record the run in MLflow (rank 0 only).")
    tracking_uri: str = doc(
        "", "MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite in the output directory's parent."
    )
    experiment: str = doc("mae-scale", "MLflow experiment name.")
    run_name: str = doc("", "MLflow run name (default: the output directory's name).")
    image_every_steps: int = doc(0, "Log a reconstruction picture every this many steps (0: at each epoch end).")
    system_metrics: bool = doc(False, "Also record MLflow system metrics (CPU / GPU utilization, memory, every "
                               "10 s) with the run.")


@dataclass
class PretrainConfig:
    output_dir: str = doc("runs/mae", "Run directory: config, checkpoints, pictures. Re-using it resumes the run.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: dict = doc({}, "Raw DeepSpeed config merged on top of the generated one (expert use).")


# ---------------------------------------------------------------------------------------------
# Loading: YAML (with `base:` inheritance) + dotted overrides -> typed tree -> validation.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not allowed; use {_type_name(tp)}")
    if tp is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads 1e-4 as text; people mean the number
            return float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp} for {key}")
    if not ok:
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    return float(value) if tp is float else value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys under {prefix.rstrip('.') or 'the top level'}: "
                          + ", ".join(names))
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    return cls(**kwargs)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursing into mappings present in both."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_preset(path: str | os.PathLike) -> dict:
    """The preset's mapping with its `base:` chain resolved (paths relative to the preset's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML preset such as "
                          "configs/pretrain/mae_vit_tiny_smoke.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base:
        data = deep_merge(read_preset(path.parent / base), data)
    return data


def apply_overrides(data: dict, overrides: list[str], cls: type | None = None) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested mapping."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.max_steps=10")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return _keep_strings(data, cls or PretrainConfig, overrides)


def _keep_strings(data: dict, cls: type, overrides: list[str]) -> dict:
    """A value typed as str stays the raw text even if YAML reads it as a number (run_name=123)."""
    for item in overrides:
        key, raw = item.split("=", 1)
        node, tp = data, cls
        parts = key.split(".")
        for part in parts[:-1]:
            hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
            tp = hints.get(part)
            node = node.get(part, {})
        hints = typing.get_type_hints(tp) if tp is not None and dataclasses.is_dataclass(tp) else {}
        if hints.get(parts[-1]) is str and not isinstance(node.get(parts[-1]), str):
            node[parts[-1]] = raw
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), cls: type | None = None,
                check: Any = None) -> Any:
    """Preset + overrides -> a validated config of type `cls` (default PretrainConfig) checked by
    `check` (default `validate`); raises ConfigError."""
    cls = cls or PretrainConfig
    data = read_preset(path) if path else {}
    data = apply_overrides(data, list(overrides), cls)
    cfg = _build(cls, data, "")
    (check or validate)(cfg)
    return cfg


def shards_exist(spec: str) -> bool:
    if spec == "builtin" or "://" in spec or spec.startswith("pipe:"):
        return True
    if "{" in spec:  # brace pattern: check the folder it lives in
        return Path(spec.split("{", 1)[0]).parent.is_dir()
    return Path(spec).exists()


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no world size. `check_batch_layout` runs once the world size is known."""
    from mae_scale.models import MODEL_NAMES

    m, d = cfg.model, cfg.data
    if m.objective == "mae" and m.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={m.name!r} is not an MAE model; use one of {', '.join(MODEL_NAMES)}")
    if m.objective != "mae":
        _validate_mim(cfg)
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio={m.mask_ratio} must be strictly between 0 and 1 (the paper: 0.75)")
    if m.init and not Path(m.init).exists():
        raise ConfigError(f"model.init={m.init!r} does not exist; point it at a .pth/.safetensors file or a run directory")
    if not shards_exist(d.train_shards):
        raise ConfigError(f"data.train_shards={d.train_shards!r} does not exist; point it at shards written by "
                          "`mae-scale make-shards`, or use `builtin`")
    if not 0.0 < d.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min={d.crop_scale_min} must be in (0, 1]")
    if d.decode_device not in ("cpu", "cpu-batched") and not d.decode_device.startswith("cuda"):
        raise ConfigError(f"data.decode_device={d.decode_device!r} is not allowed; use cpu, cpu-batched or cuda")
    if d.epoch_samples is not None and (not d.resampled or d.epoch_samples <= 0):
        raise ConfigError(f"data.epoch_samples={d.epoch_samples} needs data.resampled=true and a positive count")
    validate_training(cfg)


def validate_training(cfg: Any, positive: dict | None = None, non_negative: dict | None = None) -> None:
    """The checks every run shares (pretraining, fine-tuning, probing): batch sizes, schedule, optimizer
    numbers, checkpoints, workers; `positive` / `non_negative` add the caller's own fields."""
    d, o, t, c = cfg.data, cfg.optim, cfg.train, cfg.checkpoint
    positive = {
        "data.input_size": d.input_size, "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size, "train.epochs": t.epochs,
        "train.log_every_steps": t.log_every_steps, "checkpoint.every_steps": c.every_steps,
        "checkpoint.keep_last": c.keep_last, **(positive or {}),
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be a positive integer")
    for key, value in {"train.max_steps": t.max_steps, "train.grad_accum_steps": t.grad_accum_steps}.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be a positive integer or null")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    if not 0 <= t.warmup_epochs <= t.epochs:
        raise ConfigError(f"train.warmup_epochs={t.warmup_epochs} must be between 0 and train.epochs={t.epochs}")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    non_negative = {"optim.blr": o.blr, "optim.min_lr": o.min_lr, "optim.weight_decay": o.weight_decay,
                    **(non_negative or {})}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if o.lr is not None and o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive or null")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad={o.clip_grad} must be positive or null")
    if t.peak_tflops is not None and not 0 < t.peak_tflops < float("inf"):
        raise ConfigError(f"train.peak_tflops={t.peak_tflops} must be a positive number or null (H100 SXM: 989)")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={t.micro_batch_size}")


def _validate_mim(cfg: PretrainConfig) -> None:
    from mae_scale.models import VIT_ARCHS

    m, d = cfg.model, cfg.data
    if m.name not in VIT_ARCHS:
        raise ConfigError(f"model.name={m.name!r} is not an encoder for objective {m.objective}; use one of "
                          f"{', '.join(VIT_ARCHS)}")
    patch = VIT_ARCHS[m.name].patch_size
    if d.input_size % patch:
        raise ConfigError(f"data.input_size={d.input_size} is not a multiple of the patch size {patch}")
    if m.objective == "simmim" and (m.mask_patch_size % patch or d.input_size % m.mask_patch_size):
        raise ConfigError(f"model.mask_patch_size={m.mask_patch_size} must be a multiple of the patch size {patch} "
                          f"and divide data.input_size={d.input_size}")
    if m.objective == "beit":
        tokens = (d.input_size // patch) ** 2
        if not 0 < m.num_masking_patches < tokens or not 0 < m.min_block_patches <= m.num_masking_patches:
            raise ConfigError(f"model.num_masking_patches={m.num_masking_patches} must be in (0, {tokens}) and "
                              f"model.min_block_patches={m.min_block_patches} in (0, num_masking_patches]")
        if not m.tokenizer or not Path(m.tokenizer).is_file():
            raise ConfigError(f"model.tokenizer={m.tokenizer!r} is not a file; make one with `mae-scale tokenizer fit "
                              "SHARDS --vocab 8192 --out tok.safetensors` (or use a BEiT v2 VQ-KD .pth or a DALL-E "
                              "dVAE encoder state dict) and point model.tokenizer at it")
    if m.init:
        raise ConfigError(f"model.init is supported for objective mae only (continued MAE pretraining); "
                          f"remove it for objective {m.objective}")
    if not 0.0 <= m.drop_path < 1.0 or m.layer_scale < 0:
        raise ConfigError(f"model.drop_path={m.drop_path} must be in [0, 1) and model.layer_scale={m.layer_scale} >= 0")


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


def save_config(cfg: PretrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def reference_markdown(cls: type = PretrainConfig, prefix: str = "") -> list[str]:
    """One markdown table row per field: the README's config reference is generated from this."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += reference_markdown(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{default!r}` | {f.metadata.get('help', '')} |")
    return rows
