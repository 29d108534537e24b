"""Process-group setup for every way a run starts: torchrun, the `deepspeed` launcher, SLURM
(through the launchers package, which exports the same variables), or plain `python` (world 1).

This is the only module that reads ranks from the environment; it hands a `DistEnv` to the rest.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_started = False  # set once this process has joined a process group


def process_group_started() -> bool:
    return _started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def select_accelerator() -> None:
    """DeepSpeed's accelerator, chosen before it is imported: the CPU where there is no GPU (else it
    guesses, warns, and a CPU-only run may pick up a half-working CUDA build)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def prepare_env() -> None:
    """Fill in what a single plain `python` process lacks, and pick DeepSpeed's accelerator.

    Must run before deepspeed is imported: DeepSpeed picks its accelerator at import time.
    """
    select_accelerator()
    if "RANK" not in os.environ:  # plain python: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def init_distributed() -> DistEnv:
    prepare_env()
    import logging

    import deepspeed

    # DeepSpeed logs every save/load at INFO on every rank; the trainer prints its own progress.
    deepspeed.utils.logger.setLevel(os.environ.get("MAE_SCALE_DS_LOG_LEVEL", "WARNING"))
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    global _started
    _started = True
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """End the process group once every rank is done (call it on every rank, after success only:
    it waits for all of them).

    Why the pause: a gloo worker thread drops its last reference to a finished collective a moment
    after the caller has been released, and that frees tensors Python owns. If the interpreter is
    already finalizing then, the thread cannot take the GIL and the process dies with `terminate
    called without an active exception` (SIGABRT) after a run that succeeded. `exit_process`
    removes the window for the CLI; the pause narrows it where the interpreter must exit normally
    (under submitit, which writes the job's result at exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        time.sleep(0.2)


def exit_process(code: int) -> NoReturn:
    """Leave a process that ran collectives without interpreter finalization (see
    `shutdown_distributed`): everything of the run is already written and closed by now; what is
    left is collected (DataLoader workers shut down), stdio flushed, then `os._exit`."""
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a small tensor across ranks (in place on a copy)."""
    out = value.detach().clone().float()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(out)
        out /= torch.distributed.get_world_size()
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the ranks, in place (a no-op in a world of one); returns it."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when it is true on at least one (a collective: call it on all ranks).
    `device`: where the backend communicates, by default this rank's GPU under nccl, else the CPU."""
    if device is None:
        nccl = torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]
