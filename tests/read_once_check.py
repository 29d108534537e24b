"""Run under torchrun by test_weights.py: a run directory given as `model.init` is consolidated by
rank 0 alone; every rank ends with the same weights, the scratch file is gone, and a failure on
any one rank is every rank's failure (none is left waiting in a collective)."""

import hashlib
import json
import sys
from pathlib import Path

import torch

import mae_scale.checkpoint.consolidation
from mae_scale.distributed import exit_process, init_distributed, shutdown_distributed
import mae_scale.weights
from mae_scale.weights import SCRATCH_PREFIX, WeightsError, read_state_dict_once

consolidations = []
_real_consolidate = mae_scale.checkpoint.consolidation.consolidate


def counting_consolidate(*args, **kwargs):  # the real merge, counted per rank
    consolidations.append(str(args[0]))
    return _real_consolidate(*args, **kwargs)


_real_read = mae_scale.weights.read_state_dict
fail_shared_read = False


def read_failing_on_request(path):  # rank 1's read of rank 0's file, made to fail on request
    if fail_shared_read and str(path).endswith(".safetensors"):
        raise OSError("injected: the shared file is not visible here")
    return _real_read(path)


def errors_of(*args) -> str | None:
    try:
        read_state_dict_once(*args)
    except WeightsError as exc:
        return str(exc)
    return None


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(run_dir: str, empty_dir: str, scratch: str, out: str) -> None:
    env = init_distributed()
    mae_scale.checkpoint.consolidation.consolidate = counting_consolidate
    state = read_state_dict_once(run_dir, scratch)
    torch.distributed.barrier()  # rank 0 removes the file after everyone has read it
    scratch_left = [p.name for p in Path(scratch).iterdir() if p.name.startswith(SCRATCH_PREFIX)]
    error = errors_of(empty_dir, scratch)  # rank 0 cannot consolidate
    global fail_shared_read
    fail_shared_read = env.rank == 1
    if env.rank == 1:
        mae_scale.weights.read_state_dict = read_failing_on_request
    read_error = errors_of(run_dir, scratch)  # rank 1 cannot read what rank 0 wrote
    torch.distributed.barrier()
    scratch_after_failure = [p.name for p in Path(scratch).iterdir()]
    Path(out, f"rank{env.rank}.json").write_text(json.dumps({
        "digest": digest(state), "keys": len(state), "consolidations": consolidations,
        "scratch_left": scratch_left, "error": error, "read_error": read_error,
        "scratch_after_failure": scratch_after_failure}))
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:5])
    exit_process(0)
