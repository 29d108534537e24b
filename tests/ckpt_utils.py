"""Reading checkpoints in tests: every tensor of every file, for bitwise comparisons."""

from pathlib import Path

import torch

from mae_scale.checkpoint import safe_torch_load


def _tensors(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{prefix}[{i}]", out)


def checkpoint_tensors(ckpt_dir: Path) -> dict:
    """{file.path.to.tensor: tensor} over the model and optimizer files of one checkpoint."""
    out = {}
    for f in sorted(Path(ckpt_dir).glob("*.pt")):
        _tensors(safe_torch_load(f), f.name, out)
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
