"""Published or exported weights as the starting point of a model.

Three uses, one path (read -> adapt -> load):

* fine-tuning or linear probing a timm `VisionTransformer` from an MAE checkpoint (kind
  "finetune" / "linprobe"): MAE's decoder and mask token are dropped, the classifier starts new,
  and when the model pools by average (fc_norm) the encoder's final `norm` is dropped, as MAE's
  own fine-tuning code does;
* continuing MAE pretraining (kind "pretrain"): the encoder is required, the decoder is taken
  when the file has one and otherwise stays as initialized.

Sources: the official MAE release's `.pth` files (`{"model": state_dict, ...}`), a bare state-dict
`.pth`, a `.safetensors` file from `mae-scale export`, or a mae-scale run / checkpoint directory
(consolidated in memory; in a multi-rank run by rank 0 alone, see `read_state_dict_once`).
Nothing is unpickled that could run code: `.pth` files are read with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mae_scale.errors import UserError

KINDS = ("finetune", "linprobe", "pretrain")
# Keys a model may keep from its own initialization, per kind.
NEW_IN_CLASSIFIER = ("head.", "fc_norm.")
NEW_IN_PRETRAIN = ("decoder_", "mask_token")  # the decoder is optional in a continued-pretraining source
STATE_DICT_KEYS = ("model", "state_dict", "module")  # where checkpoints nest their weights
# Encoder weights: a file key under these that the model cannot take is an error, never dropped quietly.
ENCODER_PREFIXES = ("blocks.", "patch_embed.", "cls_token", "pos_embed")


class WeightsError(UserError, ValueError):
    """A weights file that cannot initialize the model; the message names the file or key and what fits."""


@dataclass
class InitReport:
    """What `adapt_to_model` did: keys the model keeps from its own init, keys of the file left out,
    and position tables resized to the model's patch grid (key -> (file shape, model shape))."""

    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    kept_from_model: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- reading
def _load_pth(path: Path):
    from mae_scale.checkpoint import safe_torch_load

    # Checkpoints written by MAE's training code carry their command line as an argparse.Namespace;
    # it is a plain attribute bag (unpickling it sets attributes, calls nothing else), so allowing it
    # lets those files load without opening the door to anything that runs code.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # old-style pickles: noise
            return safe_torch_load(path)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        what = f"it would import {found.group(1)}, which is not plain data" if found else \
            "it holds more than tensors and plain values"
        raise WeightsError(f"{path}: refused to unpickle ({what}); expected a state dict of tensors saved "
                           "with torch.save, or a .safetensors file") from None
    except Exception as exc:  # torch's unpickler fails on non-pickles in many ways (IndexError, EOFError, ...)
        raise WeightsError(f"{path} is not a PyTorch weights file ({type(exc).__name__}); expected a .pth "
                           "state dict, a .safetensors file, or a mae-scale run directory") from None


def _tensors_of(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded object: itself, or under "model" / "state_dict" / "module"."""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            if all(k.startswith("module.") for k in tensors):  # saved from a DDP wrapper
                tensors = {k[len("module."):]: v for k, v in tensors.items()}
            return tensors
    raise WeightsError(f"{path} holds no tensors by name ({type(obj).__name__}); expected a state dict, "
                       f"or a dict with one under {' / '.join(repr(k) for k in STATE_DICT_KEYS)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights by name from a .pth / .safetensors file or a mae-scale run or checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        from mae_scale.checkpoint import consolidation  # by module: tests count the calls

        try:
            state, _ = consolidation.consolidate(path)
        except Exception as exc:  # a damaged or foreign checkpoint (UserError), or DeepSpeed's own complaints
            raise WeightsError(f"{path}: {exc}") from None
        return state
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; expected a .pth or .safetensors file or a run directory")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _tensors_of(load_file(str(path)), path)
        except SafetensorError as exc:
            raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    return _tensors_of(_load_pth(path), path)


SCRATCH_PREFIX = "init_consolidated."  # + a per-call id + ".safetensors", in the run directory


def read_state_dict_once(path: str | Path, scratch_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """`read_state_dict` for every rank, where a run or checkpoint directory is consolidated once.

    Merging ZeRO shards reads every rank's optimizer partitions (for ViT-H, about 8 GB) and holds
    the merged model in memory; eight ranks of a node doing it at once multiply both by eight. So
    in a multi-rank run rank 0 consolidates and writes the weights to a file of its own name in
    `scratch_dir` (the run's directory, which every node sees; the name is new per call, so two
    jobs sharing an output directory never read each other's), the others read it after rank 0
    says it is complete, and rank 0 removes it once all have (or on any failure). Any rank's
    failure is raised on every rank (never a rank left waiting in a collective). Files are read by
    every rank directly: they cost no more than the copy would. A collective: call on all ranks.
    """
    dist = torch.distributed
    path = Path(path)
    if not (path.is_dir() and scratch_dir is not None and dist.is_initialized() and dist.get_world_size() > 1):
        return read_state_dict(path)
    import uuid

    from safetensors.torch import save_file

    from mae_scale.distributed import any_rank, broadcast_object

    rank0 = dist.get_rank() == 0
    scratch, state, error = None, None, None
    try:
        if rank0:
            try:
                state = read_state_dict(path)
                scratch = Path(scratch_dir) / f"{SCRATCH_PREFIX}{uuid.uuid4().hex}.safetensors"
                scratch.parent.mkdir(parents=True, exist_ok=True)
                # clone: safetensors refuses tensors that share storage (views of one flat buffer)
                save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(scratch))
            except Exception as exc:  # disk full, memory, a bad run dir: every rank must hear of it
                error = str(exc)  # load_init names the path where the message does not
        error, scratch = broadcast_object((error, scratch))
        if error is not None:
            raise WeightsError(error)
        failed = None
        if not rank0:
            try:
                state = read_state_dict(scratch)
            except Exception as exc:
                failed = f"rank {dist.get_rank()} could not read {scratch} written by rank 0 ({exc})"
        if any_rank(failed is not None):  # also the barrier: everyone has read it, or not
            raise WeightsError(failed or f"{path}: another rank could not read the consolidated weights "
                                         f"from {scratch_dir}; see its message")
        return state
    finally:
        if rank0 and scratch is not None:
            scratch.unlink(missing_ok=True)


# ---------------------------------------------------------------------- adapting
def _describe_encoder(state: dict[str, torch.Tensor]) -> str:
    """What ViT a state dict holds, by its shapes, naming the preset when one matches."""
    from mae_scale.models import VIT_ARCHS

    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4:
        return "no ViT patch embedding"
    dim, patch = proj.shape[0], proj.shape[-1]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    about = f"a ViT with {dim}-d tokens, {depth} blocks, {patch}px patches"
    for name, arch in VIT_ARCHS.items():
        if (arch.embed_dim, arch.depth, arch.patch_size) == (dim, depth, patch):
            return f"{about} ({name})"
    return about


def _grid_of(model: torch.nn.Module, tokens: int, extra: int) -> tuple[int, int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        return int(grid[0]), int(grid[1])
    side = int(round((tokens - extra) ** 0.5))
    return side, side


def adapt_to_model(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, *, kind: str
                   ) -> tuple[dict[str, torch.Tensor], InitReport]:
    """Map `state_dict` onto `model` for `kind` ("finetune", "linprobe", "pretrain").

    Returns the dict to pass to `load_state_dict(strict=False)` and a report. Raises WeightsError at
    the first model key (in model order) that the file lacks but the model needs, or whose shape
    does not fit.
    """
    from mae_scale.models import interpolate_pos_embed

    if kind not in KINDS:
        raise WeightsError(f"unknown init kind {kind!r}; expected one of: {', '.join(KINDS)}")
    allowed_new = NEW_IN_PRETRAIN if kind == "pretrain" else NEW_IN_CLASSIFIER
    target = model.state_dict()
    report = InitReport()
    source = dict(state_dict)

    for key in ("pos_embed", "decoder_pos_embed"):
        if key not in source or key not in target:
            continue
        have, want = source[key], target[key]
        if have.shape == want.shape or have.dim() != 3 or have.shape[-1] != want.shape[-1]:
            continue  # same grid, or a width mismatch the shape check below reports
        if kind == "pretrain":
            # The MAE model's tables are fixed sin-cos, already exact for its own grid.
            del source[key]
            report.kept_from_model.append(key)
            continue
        extra = getattr(model, "num_prefix_tokens", 1)
        source[key] = interpolate_pos_embed(have, _grid_of(model, want.shape[1], extra), num_extra_tokens=extra)
        report.resized[key] = (tuple(have.shape), tuple(want.shape))

    to_load: dict[str, torch.Tensor] = {}
    for key, want in target.items():
        have = source.get(key)
        new_ok = key.startswith(allowed_new) or key in report.kept_from_model
        if have is not None and tuple(have.shape) != tuple(want.shape) and key.startswith(NEW_IN_CLASSIFIER) \
                and kind != "pretrain":
            have = None  # e.g. a 1000-class head from a fine-tuned checkpoint: the new head starts fresh
        if have is None:
            if new_ok:
                if key not in report.kept_from_model:
                    report.missing.append(key)
                continue
            raise WeightsError(f"the weights have no {key!r}, which the model needs; the file holds "
                               f"{_describe_encoder(state_dict)}")
        if tuple(have.shape) != tuple(want.shape):
            raise WeightsError(f"{key}: the file has shape {tuple(have.shape)} but the model expects "
                               f"{tuple(want.shape)}; the file holds {_describe_encoder(state_dict)}: build the model "
                               "that matches it, or pick weights made for this one")
        to_load[key] = have
    report.dropped = [k for k in state_dict if k not in to_load and k not in report.kept_from_model]
    lost = [k for k in report.dropped if k.startswith(ENCODER_PREFIXES)]
    if lost:
        hint = ("the file's blocks carry layer-scale weights (SimMIM / BEiT-style encoders): set "
                "model.layer_scale=0.1" if any(".ls1." in k or ".ls2." in k for k in lost)
                else "the model has no place for them: build the model that matches the file")
        raise WeightsError(f"{lost[0]} (and {len(lost) - 1} more encoder weights) would be left out; {hint}")
    return to_load, report


def load_init(model: torch.nn.Module, path: str | Path, kind: str,
              scratch_dir: str | Path | None = None) -> InitReport:
    """Initialize `model` from the weights at `path` for `kind`; returns what stayed new or was left out.

    With `scratch_dir` (the run directory) a run or checkpoint directory is consolidated by rank 0
    only (`read_state_dict_once`; then every rank must call this)."""
    try:
        to_load, report = adapt_to_model(read_state_dict_once(path, scratch_dir), model, kind=kind)
    except WeightsError as exc:
        raise WeightsError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    result = model.load_state_dict(to_load, strict=False)
    # Fewer missing than expected is fine: BatchNorm fills a missing num_batches_tracked by itself.
    not_loaded = set(result.missing_keys) - set(report.missing) - set(report.kept_from_model)
    if result.unexpected_keys or not_loaded:
        raise WeightsError(f"{path}: loading left {sorted(not_loaded)[:5]} missing and "
                           f"{result.unexpected_keys[:5]} unexpected; this is a bug in mae-scale")
    return report
