"""One GPU, DeepSpeed ZeRO-1, -2 and -3, bf16: a run killed in the middle of a checkpoint save and
resumed ends where an uninterrupted run ends.

On a CPU this holds bit for bit (tests/test_resume.py). On a GPU it may not: cuBLAS picks its
kernels per shape and is repeatable, but the backward of fused attention and of the index ops that
gather the visible patches accumulate with atomics, whose order varies run to run, and bf16 rounding
carries such differences on. So: bitwise equality is asserted when it holds (and the report says
so); otherwise the resumed run must end within a stated tolerance of the straight one, measured
against how far the weights travel over the replayed steps (steps 2 -> 7):

    ||w_resumed(7) - w_straight(7)|| <= 0.05 x ||w_straight(7) - w_straight(2)||   (fp32 masters)
    |loss_resumed(s) - loss_straight(s)| <= 0.01 x |loss_straight(s)|              (s = 3..7)

A broken resume (fresh Adam moments, a wrong data position or LR step) replays different updates,
off by a fraction of the travelled distance comparable to 1, not 0.05. The measured figures are
printed and recorded (cuda_support.record) whatever the outcome.
"""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_utils import checkpoint_tensors
from cuda_support import FAULT, STAGES, STEPS, needs_gpu_or_rehearsal, record
from mae_scale.checkpoint import latest_checkpoint
from mae_scale.checkpoint import consolidate

pytestmark = [pytest.mark.cuda, needs_gpu_or_rehearsal]

WEIGHT_TOL = 0.05
LOSS_TOL = 0.01


def _tail(proc) -> str:
    return f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize("zero", STAGES, ids=[f"zero{z}" for z in STAGES])
def test_killed_and_resumed_run_ends_where_the_straight_run_ends(gpu_runs, zero):
    r = gpu_runs[zero]
    procs = r["procs"]
    assert procs["straight"].returncode == 0, _tail(procs["straight"])
    assert procs["killed"].returncode != 0, f"MAE_SCALE_FAULT={FAULT} did not kill the run:\n" + _tail(procs["killed"])
    assert r["partial_save_left"], "the kill did not land between step 4's files and its COMPLETE marker"
    assert procs["resumed"].returncode == 0, _tail(procs["resumed"])
    assert "resumed from" in procs["resumed"].stdout and "step_00000002" in procs["resumed"].stdout

    end_s, end_r = latest_checkpoint(r["straight"]), latest_checkpoint(r["resumed"])
    assert end_s.name == end_r.name == f"step_{STEPS:08d}"
    ts, tr = checkpoint_tensors(end_s), checkpoint_tensors(end_r)
    assert ts.keys() == tr.keys() and len(ts) > 10
    bitwise = all(torch.equal(ts[k], tr[k]) for k in ts)
    max_abs = max(((ts[k].double() - tr[k].double()).abs().max().item() if ts[k].numel() else 0.0)
                  for k in ts if ts[k].is_floating_point())

    w_s, _ = consolidate(end_s)
    w_r, _ = consolidate(end_r)
    w_2, _ = consolidate(r["straight"] / "checkpoints/step_00000002")
    keys = [k for k in w_s if w_s[k].is_floating_point() and not torch.equal(w_s[k], w_2[k])]
    assert keys, "no weight moved between steps 2 and 7: the comparison below would be empty"
    diff = torch.sqrt(sum(((w_r[k].double() - w_s[k].double()) ** 2).sum() for k in keys))
    travel = torch.sqrt(sum(((w_s[k].double() - w_2[k].double()) ** 2).sum() for k in keys))
    rel = (diff / travel).item()
    loss_s, loss_r = _losses(r["straight"]), _losses(r["resumed"])
    assert sorted(loss_r) == list(range(1, STEPS + 1)), "replayed metric rows must replace, not repeat"
    loss_rel = max(abs(loss_r[s] - loss_s[s]) / abs(loss_s[s]) for s in range(3, STEPS + 1))
    record(test="resume", zero=zero, precision="bf16", bitwise=bitwise, max_abs_diff=max_abs,
           rel_weight_diff=rel, max_loss_rel_diff=loss_rel, weight_tol=WEIGHT_TOL, loss_tol=LOSS_TOL)
    if bitwise:
        return
    assert rel <= WEIGHT_TOL, f"resumed weights are {rel:.3g} of the travelled distance away (tolerance {WEIGHT_TOL})"
    assert loss_rel <= LOSS_TOL, f"replayed losses differ by up to {loss_rel:.3g} relative (tolerance {LOSS_TOL})"
