"""Run under torchrun by test_weights.py: a run directory given as `model.init` is consolidated by
rank 0 alone; every rank ends with the same weights, the scratch file is gone, and a failure on
rank 0 is every rank's failure."""

import hashlib
import json
import sys
from pathlib import Path

import torch

import mae_scale.export
from mae_scale.distributed import exit_process, init_distributed, shutdown_distributed
from mae_scale.weights import SCRATCH_NAME, WeightsError, read_state_dict_once

consolidations = []
_real_consolidate = mae_scale.export.consolidate


def counting_consolidate(*args, **kwargs):  # the real merge, counted per rank
    consolidations.append(str(args[0]))
    return _real_consolidate(*args, **kwargs)


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(run_dir: str, empty_dir: str, scratch: str, out: str) -> None:
    env = init_distributed()
    mae_scale.export.consolidate = counting_consolidate
    state = read_state_dict_once(run_dir, scratch)
    torch.distributed.barrier()  # rank 0 removes the file after everyone has read it
    scratch_left = (Path(scratch) / SCRATCH_NAME).exists()
    try:
        read_state_dict_once(empty_dir, scratch)
        error = None
    except WeightsError as exc:
        error = str(exc)
    Path(out, f"rank{env.rank}.json").write_text(json.dumps({
        "digest": digest(state), "keys": len(state), "consolidations": consolidations,
        "scratch_left": scratch_left, "error": error}))
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:5])
    exit_process(0)
