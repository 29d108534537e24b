"""The config rules that need more than one field: model shapes against the input size, fields the
chosen objective would ignore, the raw DeepSpeed dict, and what the machine must have (a writable
run directory, shards whose manifest reads, a device that exists, an epoch that holds a batch).

Used by `mae_scale.config.validate` and `mae_scale.finetune_config.validate_finetune`, before any
work: every rule raises `ConfigError` with one line naming the key and what to do. Nothing here
reads a tar: sample counts come from the manifest, a foreign index (timm _info.json, wids,
img2dataset stats) or the size of the built-in set.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from mae_scale.config_load import ConfigError, config_warning, default_of, leaf_fields


def check_input_size(size: int, patch: int, what: str) -> int:
    if size < patch or size % patch:
        fit = max(patch, round(size / patch) * patch)
        raise ConfigError(f"data.input_size={size} must be a multiple of the patch size {patch} of {what} (at least "
                          f"one patch), e.g. {fit}")
    return patch


# A model.* field set away from its default under an objective that does not read it (`reads` of
# each objective) is refused where it shapes the masks or the targets: the user believes the run
# masks or predicts something it does not, and most likely meant another objective. Where it is a
# regularizer or a loss detail, the run is still what was asked for in substance: one warning line.
REFUSED_WHEN_IGNORED = ("mask_ratio", "mask_patch_size", "num_masking_patches", "min_block_patches", "tokenizer")


def objective_fields() -> dict[str, tuple[str, ...]]:
    """model.* field -> the objectives that read it; refused fields first, then the warned ones."""
    from mae_scale.objectives import OBJECTIVES

    fields = dict.fromkeys(f for objective in OBJECTIVES.values() for f in objective.reads)
    ordered = sorted(fields, key=lambda f: (f not in REFUSED_WHEN_IGNORED, REFUSED_WHEN_IGNORED.index(f)
                                             if f in REFUSED_WHEN_IGNORED else 0))
    return {f: tuple(name for name, o in OBJECTIVES.items() if f in o.reads) for f in ordered}


def check_objective_fields(cfg: Any) -> None:
    defaults = {key: default_of(f) for key, f, _ in leaf_fields(type(cfg.model))}
    objective = cfg.model.objective
    for name, readers in objective_fields().items():
        value = getattr(cfg.model, name)
        if objective in readers or value == defaults[name]:
            continue
        what = (f"model.{name}={value!r} is read only by objective {' / '.join(readers)}; with "
                f"model.objective={objective} it would be ignored")
        if name in REFUSED_WHEN_IGNORED:
            raise ConfigError(f"{what}: remove it, or set model.objective={readers[0]} if that was meant")
        config_warning(f"{what} (the run goes on without it)")


def check_unused_fields(section: str, obj: Any, readers: dict[str, tuple], chosen: str, switch: str) -> None:
    """Warn for fields of `section` that the `switch` choice `chosen` does not read (finetune's optimizer)."""
    defaults = {key: default_of(f) for key, f, _ in leaf_fields(type(obj))}
    for name, who in readers.items():
        value = getattr(obj, name)
        if chosen not in who and value != defaults[name]:
            config_warning(f"{section}.{name}={value!r} is read only with {switch}={' / '.join(who)}; "
                           f"with {switch}={chosen} it is ignored")


def check_decode_device(value: str, here: bool) -> None:
    """cpu, cpu-batched, cuda or cuda:N; with `here`, the device must exist on this machine."""
    m = re.fullmatch(r"cuda(?::(\d+))?", value)
    if value in ("cpu", "cpu-batched"):
        return
    if not m:
        raise ConfigError(f"data.decode_device={value!r} is not allowed; use cpu, cpu-batched, cuda or cuda:N")
    if not here:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"data.decode_device={value} but this machine has no CUDA device; use cpu or cpu-batched")
    count = torch.cuda.device_count()
    if m[1] is not None and int(m[1]) >= count:
        raise ConfigError(f"data.decode_device={value} names a GPU this machine lacks (it has {count}: cuda:0.."
                          f"cuda:{count - 1}); use cuda (each rank's own GPU)")


def check_writable_dir(key: str, path: str) -> None:
    """A directory that exists or can be made, and written: walk up to the first existing parent."""
    p = Path(os.path.abspath(path))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path!r} is a file, not a directory; pick another path")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise ConfigError(f"{key}={path!r} lies under {q}, which is a file; pick another path")
    if not os.access(q, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path!r} cannot be written ({q} is not writable for this user); pick another path")


def check_output_dir(path: str) -> None:
    if not path.strip():
        raise ConfigError("output_dir is empty; name the run directory, e.g. output_dir=runs/my_run")
    check_writable_dir("output_dir", path)


# ---------------------------------------------------------------------------------------------
# Shards: what the loader will need, read from the manifest only.


def builtin_samples() -> int:
    """Images of the `builtin` set: the trainer makes it with builtin_shards' default size."""
    from data_pipeline import builtin_shards

    return inspect.signature(builtin_shards).parameters["n_images"].default


def _manifest(key: str, path: Path) -> dict:
    """The manifest as the loader reads it (data_pipeline.read_manifest), plus the per-shard fields
    the loader takes (name, samples)."""
    from data_pipeline import read_manifest

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}: {path} is not valid JSON ({' '.join(str(exc).split())}); write the shards again "
                          "with `mae-scale make-shards`") from None
    try:
        m = read_manifest(path)
        for i, s in enumerate(m["shards"]):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("samples"), int):
                raise ValueError(f"{path}: shard entry {i} lacks a name or a sample count")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{key}: {' '.join(str(exc).split())}; write the shards again with "
                          "`mae-scale make-shards`") from None
    return m


def _listed_total(key: str, folder: Path, names: list[str]) -> Optional[int]:
    """Samples of these tars when the folder's manifest lists them all, else None."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        return None
    counts = {s["name"]: s["samples"] for s in _manifest(key, mpath)["shards"]}
    return sum(counts[n] for n in names) if all(n in counts for n in names) else None


def _foreign_total(key: str, urls: list[str], resampled: bool) -> Optional[int]:
    """Samples of tars that our manifest does not list, from an index beside them (timm _info.json,
    wids, img2dataset stats; no tar is read); None when only their headers would say. Remote shards
    without an index are refused unless the run is resampled."""
    from data_pipeline.index import index_counts, is_remote, remote_refusal

    found = index_counts(urls)
    if found is not None:
        return sum(found[0])
    remote = [u for u in urls if is_remote(u)]
    if remote and not resampled:
        raise ConfigError(f"{key}: {remote_refusal(len(remote))}")
    return None


def check_sample_keys(image_key: str, label_key: str, section: str = "data") -> None:
    """data.image_key / data.label_key as the loader parses them (data_pipeline.keys)."""
    from data_pipeline.keys import parse_keys

    try:
        parse_keys(image_key, label_key)
    except ValueError as exc:
        raise ConfigError(f"{section}.{exc}") from None


def check_mix(key: str, spec: Any, hint: str, resampled: bool = False) -> Optional[int]:
    """`data.train_shards` as a string, or as a list of sources {shards, weight, name}: each source
    must exist and carry a positive finite weight. Returns the samples of the sources together
    (None when any is only known by reading it)."""
    if isinstance(spec, str):
        return check_shards(key, spec, hint, resampled=resampled)
    if resampled:
        raise ConfigError(f"{key} is a mix of sources, which does not combine with data.resampled=true (a mix "
                          "already draws each source by its weight); set data.resampled=false")
    if not spec:
        raise ConfigError(f"{key}=[] names no source; give a path, or a list of {{shards: PATH, weight: W}}")
    total: Optional[int] = 0
    names = set()
    for i, src in enumerate(spec):
        where = f"{key}[{i}]"
        if set(src) - {"shards", "weight", "name"} or not isinstance(src.get("shards"), str):
            raise ConfigError(f"{where}={src!r} must be {{shards: PATH, weight: W}} (name optional)")
        w = src.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"{where}.weight={w!r} must be a positive finite number")
        name = src.get("name")
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name) or name in names):
            raise ConfigError(f"{where}.name={name!r} must be unique letters, digits or '_'")
        names.add(name)
        n = check_shards(f"{where}.shards", src["shards"], hint)
        total = None if total is None or n is None else total + n
    return total


def check_shards(key: str, spec: str, hint: str, resampled: bool = False) -> Optional[int]:
    """Refuse shards the loader could not open; return the samples of one epoch where a manifest, a
    foreign index (or `builtin`) says it, None where only the tars' headers would (unlisted tars)."""
    from braceexpand import braceexpand

    if not spec:
        raise ConfigError(f"{key} is empty; point it at {hint}")
    if spec == "builtin":
        return builtin_samples()
    if "://" in spec or spec.startswith("pipe:"):
        return _foreign_total(key, list(braceexpand(spec)), resampled)
    if "{" in spec:
        tars = [Path(u) for u in braceexpand(spec)]
        missing = [t for t in tars if not t.is_file()]
        if len(missing) == len(tars):
            raise ConfigError(f"{key}={spec!r} matches no file (the first name it makes is {tars[0]}); check the "
                              "pattern against the folder")
        if missing:
            raise ConfigError(f"{key}={spec!r}: {len(missing)} of its {len(tars)} files are missing, e.g. {missing[0]}")
        folders = {t.parent for t in tars}
        listed = _listed_total(key, tars[0].parent, [t.name for t in tars]) if len(folders) == 1 else None
        return listed if listed is not None else _foreign_total(key, [str(t) for t in tars], resampled)
    p = Path(spec)
    if not p.exists():
        raise ConfigError(f"{key}={spec!r} does not exist; point it at {hint}")
    if p.is_dir():
        mpath = p / "manifest.json"
        if not mpath.is_file():
            tars = sorted(p.glob("*.tar"))
            if tars:  # foreign shards: counted from an index beside them, else from their headers
                total = _foreign_total(key, [str(t) for t in tars], resampled)
                return total if total is not None else _header_total(key, spec, p, tars)
            raise ConfigError(f"{key}={spec!r} holds neither manifest.json nor .tar shards; point it at {hint}")
    elif p.suffix == ".json":
        if Path(spec).name != "manifest.json" and not _looks_ours(p):  # a wids index or timm's _info.json
            from data_pipeline import DataInputError
            from data_pipeline.index import json_index

            try:
                return sum(json_index(spec)[1])
            except DataInputError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        mpath = p
    else:  # one tar: counted from its folder's manifest if that lists it
        listed = _listed_total(key, p.parent, [p.name])
        return listed if listed is not None else _foreign_total(key, [spec], resampled)
    m = _manifest(key, mpath)
    # an entry with a url (written by `data index`) names a remote shard or one elsewhere
    absent = [s.get("url") or s["name"] for s in m["shards"]
              if not (s.get("url") and ("://" in s["url"] or s["url"].startswith("pipe:")))
              and not (Path(s["url"]) if s.get("url") else mpath.parent / s["name"]).is_file()]
    if absent:
        raise ConfigError(f"{key}: {mpath} lists {len(absent)} shard(s) that are not there, e.g. {absent[0]}; "
                          "copy them or write the shards again")
    return m["total"]


def _pattern_hint(folder: Path, tars: list[Path]) -> str:
    first, last = (re.fullmatch(r"(.*?)(\d+)\.tar", t.name) for t in (tars[0], tars[-1]))
    if first and last and first[1] == last[1] and len(first[2]) == len(last[2]):
        return f"{folder}/{first[1]}{{{first[2]}..{last[2]}}}.tar"
    return f"{folder}/NAME-{{000000..000009}}.tar"


def _header_total(key: str, spec: str, folder: Path, tars: list[Path]) -> int:
    """A folder of tars with no index: their samples from the tar headers (what the loader would do
    first anyway; the count is cached for it). A folder whose tars hold no sample is refused."""
    from data_pipeline.index import count_and_cache

    total = sum(c.samples for c in count_and_cache([str(t) for t in tars]))
    if total == 0:
        raise ConfigError(f"{key}={spec!r} has {len(tars)} tars but no manifest.json or index, and no sample in them; "
                          f"point at shards, name the ones to use with a brace pattern such as "
                          f"{_pattern_hint(folder, tars)}, or write them with `mae-scale make-shards`")
    return total


def _looks_ours(p: Path) -> bool:
    try:
        return '"mae-scale-shards/' in p.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return True


def check_epoch_holds_a_batch(key: str, samples: Optional[int], global_batch: int) -> None:
    """An epoch smaller than one global batch gives zero optimizer steps at any world size."""
    if samples is None:
        return
    if samples == 0:
        raise ConfigError(f"{key} holds no samples; point it at shards with data")
    if global_batch > samples:
        raise ConfigError(f"train.global_batch_size={global_batch} is larger than one epoch of {key} ({samples} "
                          "samples): no optimizer step could run; lower it (and train.micro_batch_size) or use more data")


# ---------------------------------------------------------------------------------------------
# The raw `deepspeed:` dict: top-level keys only (DeepSpeed checks its own sections).

# Keys the typed config writes into the generated DeepSpeed config: set there, they would fight it.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps (or leave it derived)",
    "gradient_clipping": "optim.clip_grad",
    "fp16": "train.precision (bf16 or fp32)",
    "amp": "train.precision (bf16 or fp32)",
    "optimizer": "optim.* (the project builds the optimizer)",
    "scheduler": "optim.* and train.warmup_epochs (the project sets the learning rate every step)",
}
KNOWN_DEEPSPEED_KEYS = {
    *OWNED_DEEPSPEED_KEYS, "bf16", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler",
    "activation_checkpointing", "aio", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients", "torch_autocast", "checkpoint",
    "data_types", "elasticity", "autotuning", "data_efficiency", "curriculum_learning", "compression_training",
    "pipeline", "disable_allgather", "disable_python_gc", "dataloader_drop_last", "sparse_attention",
    "progressive_layer_drop", "eigenvalue", "quantize_training", "hybrid_engine", "nebula", "compile", "timers",
    "weight_quantization", "graph_harvesting", "use_data_before_expert_parallelism", "log_level",
    "managed_gradient_accumulation", "expert_parallel", "check_overflow",
}


def check_deepspeed(cfg: Any) -> None:
    ds = cfg.deepspeed
    for key, value in ds.items():
        if key in OWNED_DEEPSPEED_KEYS:
            raise ConfigError(f"deepspeed.{key} is generated from {OWNED_DEEPSPEED_KEYS[key]}; set that instead")
        if key in ("bf16", "zero_optimization") and not isinstance(value, dict):
            raise ConfigError(f"deepspeed.{key}={value!r} must be a mapping (it is merged into the generated one)")
    if "enabled" in ds.get("bf16", {}):
        raise ConfigError("deepspeed.bf16.enabled is generated from train.precision; set that instead")
    if "stage" in ds.get("zero_optimization", {}):
        raise ConfigError("deepspeed.zero_optimization.stage is generated from train.zero_stage; set that instead")
    for key in ds:
        if key not in KNOWN_DEEPSPEED_KEYS:
            config_warning(f"deepspeed.{key} is not a DeepSpeed config key this project knows; DeepSpeed may ignore "
                           "it (check the spelling)")
