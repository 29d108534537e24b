"""Changing the world size on resume: a ZeRO checkpoint written at world 2 is converted to a
universal checkpoint and loaded at world 1; the fp32 master weights come back bitwise and the
run trains on to its end."""

import json
import textwrap

import pytest
import torch

from run_helpers import ROOT, SMOKE, base_overrides, run_env, run_pretrain
from mae_scale.checkpoint import latest_checkpoint
from mae_scale.checkpoint.reshard import DONE, convert, universal_dir_for

# A world-1 resume through the real trainer that also saves the fp32 master weights right after
# the load (the moment the test needs to compare), then trains on.
RESUME_AT_WORLD_1 = textwrap.dedent("""
    import sys, torch
    from mae_scale.config import load_config
    from mae_scale.distributed import init_distributed
    from mae_scale.train import build_loop
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = load_config(sys.argv[1], sys.argv[3:])
    env = init_distributed()
    trainer = build_loop(cfg, env)
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in trainer.engine.module.named_parameters()
               if p.requires_grad}
    torch.save({"weights": weights, "step": trainer.global_step}, sys.argv[2])
    trainer.train()
""")


def _fp32_weights_of(ckpt_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_world2_checkpoint_resumes_at_world1_bitwise(small_shards, tmp_path, zero_stage):
    import subprocess
    import sys

    out = tmp_path / "run"
    extra = {"train.zero_stage": zero_stage, "checkpoint.every_steps": 4}
    run_pretrain(base_overrides(small_shards, out, **extra, **{"train.max_steps": 4}), nproc=2)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_00000004"
    saved = _fp32_weights_of(ckpt)

    # Conversion by itself: idempotent, and leaves nothing half-written behind.
    universal = convert(ckpt)
    assert universal == universal_dir_for(ckpt) and (universal / DONE).is_file()
    assert convert(ckpt) == universal
    assert not (ckpt.parent / ".universal_staging").exists()

    script = tmp_path / "resume_world1.py"
    script.write_text(RESUME_AT_WORLD_1)
    dump = tmp_path / "loaded.pt"
    args = base_overrides(small_shards, out, **extra, **{"train.max_steps": 6})
    proc = subprocess.run([sys.executable, str(script), str(SMOKE), str(dump), *args], capture_output=True,
                          text=True, timeout=600, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resharding step_00000004: world size 2 -> 1" in proc.stdout

    loaded = torch.load(dump, weights_only=True)
    assert loaded["step"] == 4
    names = loaded["weights"].keys()
    assert len(names) > 10 and names <= saved.keys()
    different = [n for n in names if not torch.equal(loaded["weights"][n], saved[n].float())]
    assert not different, f"{len(different)} fp32 weights differ after resharding, e.g. {different[:3]}"

    # ... and the run trained on at world 1 to its end.
    assert latest_checkpoint(out).name == "step_00000006"
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert [(a["world_size"], a["resumed_from_step"]) for a in attempts] == [(2, None), (1, 4)]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
