"""Layer-wise LR decay exactly as BEiT / MAE define it, on a real ViT-B/16, and applied by DeepSpeed."""

import math
import re

import pytest
import torch

from mae_scale.lars import LARS
from mae_scale.models import build_vit_classifier
from mae_scale.optim import param_groups_lrd, set_lr


def expected_layer(name: str, depth: int) -> int:
    """The rule, written out independently: tokens + patch embedding 0, block i -> i + 1, rest depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


@pytest.fixture(scope="module")
def vit_b():
    with torch.device("meta"):
        return build_vit_classifier("vit_base_patch16", num_classes=1000)


def test_vit_b_groups_follow_the_beit_mae_rule(vit_b):
    decay, wd = 0.75, 0.05
    groups = param_groups_lrd(vit_b, weight_decay=wd, layer_decay=decay)
    seen = {}
    for group in groups:
        for name, param in zip(group["param_names"], group["params"]):
            seen[name] = (group["lr_scale"], group["weight_decay"], param)
    assert set(seen) == {n for n, p in vit_b.named_parameters() if p.requires_grad}
    depth = 12
    for name, (scale, group_wd, param) in seen.items():
        layer = expected_layer(name, depth)
        assert math.isclose(scale, decay ** (depth + 1 - layer), rel_tol=1e-12), name
        no_decay = param.ndim == 1 or name in ("cls_token", "pos_embed")
        assert group_wd == (0.0 if no_decay else wd), name
    # spot checks a reader can verify by hand
    assert math.isclose(seen["cls_token"][0], 0.75 ** 13)
    assert math.isclose(seen["patch_embed.proj.weight"][0], 0.75 ** 13) and seen["patch_embed.proj.weight"][1] == wd
    assert math.isclose(seen["blocks.0.attn.qkv.weight"][0], 0.75 ** 12)
    assert math.isclose(seen["blocks.11.mlp.fc2.weight"][0], 0.75)
    assert seen["fc_norm.weight"][:2] == (1.0, 0.0) and seen["head.weight"][:2] == (1.0, wd)
    assert seen["blocks.5.norm1.bias"][1] == 0.0 and seen["pos_embed"][1] == 0.0


def test_set_lr_applies_the_scale_per_group_inside_deepspeed(world_of_one):
    import deepspeed

    model = build_vit_classifier("vit_tiny_patch16", num_classes=3, img_size=32)
    groups = param_groups_lrd(model, 0.05, 0.5)
    names = [g.pop("param_names") for g in groups]
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(groups, lr=0.0),
        config={"train_batch_size": 2, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True},
        dist_init_required=False)
    set_lr(optimizer, 1e-3)
    lrs = {tuple(n): g["lr"] for n, g in zip(names, optimizer.param_groups)}
    for n, lr in lrs.items():
        layer = expected_layer(n[0], 4)
        assert math.isclose(lr, 1e-3 * 0.5 ** (5 - layer)), n[0]
    # and the engine's optimizer really steps with those rates: a block-0 weight moves less than the head
    before = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    out = engine(torch.randn(2, 3, 32, 32))
    engine.backward(out.logsumexp(1).mean())
    engine.step()
    moved = {k: (v.detach() - before[k]).abs().max().item() for k, v in engine.module.named_parameters()}
    assert 0 < moved["blocks.0.attn.qkv.weight"] < moved["head.weight"]


def test_lars_scales_matrices_by_trust_ratio_and_leaves_biases_plain():
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = LARS([{"params": [w, b]}], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 4.0)
    b.grad = torch.ones(2)
    opt.step()
    # ||w|| = 6, ||g|| = 8: the update is g x 0.001 x 6 / 8
    assert torch.allclose(w.detach(), torch.full((2, 2), 3.0 - 4.0 * 0.001 * 6 / 8))
    assert torch.allclose(b.detach(), -torch.ones(2))


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
def test_lars_under_zero_at_world2_matches_plain_lars(stage, tmp_path):
    """DeepSpeed gives LARS flat partitions of its groups; the trust ratios must still be the
    whole matrices' (and differ from plain SGD, or the test would prove nothing)."""
    import json
    import subprocess
    import sys

    from run_helpers import ROOT, run_env

    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/lars_zero_check.py"), str(stage), str(out)],
                          capture_output=True, text=True, timeout=300, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_diff_lars"] < 1e-6 and result["max_diff_sgd"] > 1e-3, result
