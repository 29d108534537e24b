"""One checkpoint -> its full fp32 state dict, whatever ZeRO stage and world size wrote it.

The fp32 master weights are the truth of a run (bf16 module copies are rounded):

* ZeRO-0, fp32: the module states are the master weights.
* ZeRO-0, bf16: the fp32 master copies sit in the model-states file (`optimizer.fp32_groups`) in
  the optimizer's parameter order, without names; see `_name_zero0_masters` for how they are named.
* ZeRO-1/2/3: DeepSpeed's own `zero_to_fp32` merges the partitions of every rank, run with its
  `torch.load` swapped for a `weights_only=True` one, so no checkpoint file can execute code.

Frozen parameters (and buffers) are not in the optimizer, so they come from the module states,
bf16-rounded in bf16 runs (a bf16 linear probe's frozen encoder is its bf16 copy: the fp32
originals are only in the probe's init file). MAE's only frozen tensors are its fixed sin-cos
tables, so for MAE pretraining runs they are recomputed exactly instead.

Every damaged or foreign input is one line (`UserError`): a checkpoint whose files fail the sizes
and checksums of its marker is never consolidated.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import torch

from mae_scale.checkpoint.integrity import check_files, describe_error
from mae_scale.checkpoint.manager import MARKER, latest_checkpoint, read_marker
from mae_scale.checkpoint.safe_load import deepspeed_value_types, safe_torch_load
from mae_scale.errors import UserError

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: one file with the (rank-0) module states
SINCOS_TABLES = ("pos_embed", "decoder_pos_embed")


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Floating tensors to fp32; integer buffers (BatchNorm's num_batches_tracked) keep their dtype."""
    return t.float() if t.is_floating_point() else t


def resolve_checkpoint(src: str | Path) -> Path:
    """A run directory (its newest complete checkpoint) or one checkpoint directory -> that directory."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src} does not exist; pass a run directory or one of its checkpoints/step_* folders")
    if (src / MARKER).is_file():
        return src
    ckpt = latest_checkpoint(src) if src.is_dir() else None
    if ckpt is None:
        raise UserError(f"{src} has no complete checkpoint (no checkpoints/step_*/{MARKER}); "
                          "pass a run directory that has saved one, or a step_* folder with its marker")
    return ckpt


def intact_marker(ckpt: Path) -> dict:
    """The checkpoint's marker, after checking every file against the sizes and checksums it
    records (damaged bytes must not be exported); one line naming the first bad file otherwise."""
    try:
        marker = read_marker(ckpt)
        if not isinstance(marker, dict):  # valid JSON, but not a marker this code wrote
            raise ValueError(f"holds a JSON {type(marker).__name__}, not an object")
    except (OSError, ValueError) as exc:
        raise UserError(f"{ckpt / MARKER} cannot be read ({describe_error(exc)}); the checkpoint is damaged: "
                          "export an earlier checkpoints/step_* folder") from None
    problems = check_files(ckpt, marker)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; the checkpoint {ckpt.name} is damaged: export an earlier "
                          "checkpoints/step_* folder, or restore this one from a copy")
    return marker


def _run_config(ckpt: Path) -> dict:
    """The run's config.yaml as a plain dict (RUN_DIR/checkpoints/step_*/ -> RUN_DIR/config.yaml), or {}."""
    import yaml

    path = ckpt.parent.parent / "config.yaml"  # the run directory's (train.rundir.CONFIG), two levels up
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


@contextlib.contextmanager
def _torch_load_weights_only() -> Iterator[None]:
    """Make every `torch.load` inside the block refuse code, whatever `weights_only` its caller passes.

    DeepSpeed's zero_to_fp32 calls `torch.load(..., weights_only=False)`; this swaps the function for
    one that forces `weights_only=True` with DeepSpeed's plain value types allowed (the same list as
    `safe_torch_load`; not safe_torch_load itself, which would call the swapped function again).
    """
    original = torch.load

    def load(f, map_location=None, *args, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(deepspeed_value_types()):
            return original(f, map_location=map_location, *args, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _zero_partitioned_fp32(ckpt: Path) -> dict[str, torch.Tensor]:
    """ZeRO-1/2/3 at any world size: DeepSpeed's merge of every rank's fp32 partitions, loaded safely."""
    from mae_scale.distributed import select_accelerator

    select_accelerator()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 prints progress; the CLI prints one line of its own
    with _torch_load_weights_only(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    state = {k: fp32(v) for k, v in state.items()}
    if (ckpt / MODEL_STATES).is_file():
        # ZeRO-1 records no frozen parameters for zero_to_fp32 (stage 2 does); its module states hold
        # the whole module, so frozen entries come from there.
        module = safe_torch_load(ckpt / MODEL_STATES)["module"]
        state.update({k: fp32(v) for k, v in module.items() if k not in state})
    return state


def _name_zero0_masters(module: dict[str, torch.Tensor], groups: list[list[torch.Tensor]],
                        buffers: list[str]) -> dict[str, torch.Tensor]:
    """Give ZeRO-0 bf16's unnamed fp32 master copies their parameter names.

    DeepSpeed stores them per optimizer group, in the order the parameters were handed to the
    optimizer, without names. The groups are built by walking `named_parameters()` (module order)
    and sorting each parameter into a group, so within a group masters follow module order. Each
    master therefore takes the first not-yet-named module entry of its shape whose bf16 copy is
    exactly the master rounded to bf16 (which every step of DeepSpeed's bf16 optimizer guarantees).
    Should two entries of one shape ever share the same bf16 values, picking the wrong one moves
    each by less than one bf16 rounding step, no worse than exporting the bf16 copy itself.
    """
    free = [name for name in module if name not in buffers]
    named: dict[str, torch.Tensor] = {}
    for group in groups:
        for master in group:
            for i, name in enumerate(free):
                copy = module[name]
                if copy.shape == master.shape and torch.equal(master.to(copy.dtype), copy):
                    named[name] = master.float()
                    del free[i]
                    break
            else:
                raise UserError(f"a ZeRO-0 fp32 master of shape {tuple(master.shape)} matches no module "
                                  "parameter; the checkpoint is not one mae-scale wrote")
    return named


def _zero0_fp32(ckpt: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0: module states (fp32 runs) or the bf16 optimizer's fp32 masters (bf16 runs)."""
    import pickle

    # A marker written before file lists were recorded vouches for nothing: the file may be absent
    # or unreadable, which is a damaged checkpoint (one line), not a crash.
    try:
        states = safe_torch_load(ckpt / MODEL_STATES)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"{ckpt / MODEL_STATES} cannot be read ({describe_error(exc)}); the checkpoint is "
                          "damaged or incomplete: export an earlier checkpoints/step_* folder") from None
    module = dict(states["module"])
    groups = (states.get("optimizer") or {}).get("fp32_groups")
    state = {k: fp32(v) for k, v in module.items()}  # frozen entries and buffers keep the module's values
    if groups:
        state.update(_name_zero0_masters(module, groups, states.get("buffer_names") or []))
    return state


def _restore_sincos_tables(state: dict[str, torch.Tensor], config: dict) -> None:
    """MAE's frozen sin-cos tables, recomputed in fp64 instead of taken from a bf16 module copy."""
    from mae_scale.models import MODEL_NAMES, get_2d_sincos_pos_embed

    if (config.get("model") or {}).get("name") not in MODEL_NAMES:
        return  # not an MAE pretraining run: its position embeddings are learned, keep them
    for key in SINCOS_TABLES:
        if key not in state:
            continue
        _, tokens, dim = state[key].shape
        side = int(round((tokens - 1) ** 0.5))
        table = get_2d_sincos_pos_embed(dim, side, cls_token=True).float().unsqueeze(0)
        # The stored copy is this table, possibly bf16-rounded; anything else is not MAE's table.
        if table.shape != state[key].shape or not torch.allclose(table, state[key], atol=1e-2, rtol=1e-2):
            raise UserError(f"{key} in the checkpoint is not MAE's fixed sin-cos table; refusing to replace it")
        state[key] = table


def consolidate(src: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 state dict of a run's newest checkpoint (or of one checkpoint) + facts about it."""
    ckpt = resolve_checkpoint(src)
    marker = intact_marker(ckpt)
    config = _run_config(ckpt)
    stage = marker.get("zero_stage")
    if stage is None:  # markers written before the stage was recorded: the files say it
        stage = 0 if (ckpt / MODEL_STATES).is_file() and not any(ckpt.glob("*optim_states.pt")) else 1
    if stage == 0 and not any(ckpt.glob("*optim_states.pt")):
        state = _zero0_fp32(ckpt)
    else:  # ZeRO-1/2/3 (and a ZeRO-0 run whose bf16 optimizer wrote partition files of its own)
        try:
            state = _zero_partitioned_fp32(ckpt)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            raise UserError(f"{ckpt}: DeepSpeed could not merge its fp32 partitions ({exc}); "
                              "is every rank's *_optim_states.pt file there?") from None
    _restore_sincos_tables(state, config)
    model_cfg = config.get("model") or {}
    info = {"checkpoint": str(ckpt), "step": marker.get("step"), "zero_stage": stage,
            "world_size": marker.get("world_size"),
            "model": model_cfg.get("name") or model_cfg.get("arch") or "unknown"}
    return state, info
