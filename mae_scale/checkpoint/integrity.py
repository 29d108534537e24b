"""Checksums of checkpoint files: recorded when a checkpoint is written, checked before it is loaded.

Why: a few flipped bytes inside a tensor (a bad disk, a bad copy, a filesystem bug) still unpickle
fine, so without a checksum a run resumes from damaged weights and nobody notices. Every file of
a checkpoint gets its size and CRC-32 in the COMPLETE marker:

    {"step": 1000, ..., "checksum": "crc32",
     "files": {"mp_rank_00_model_states.pt": [123456, "1a2b3c4d"], ...}}

Who hashes what: each rank hashes the files it wrote itself, right after writing them (they are
still in its page cache, so this is a memory read, not a second trip to the filesystem), through a
wrapper around the DeepSpeed engine's `checkpoint_engine.save`; rank 0 gathers the lists and adds
the few small files DeepSpeed writes around the checkpoint engine (`zero_to_fp32.py`). At load,
the files are checked in parallel (rank r checks every world-th file; the run directory is on a
filesystem every node sees) and the verdicts are gathered, so every rank reaches the same one.

Why CRC-32 (zlib): this guards against damage, not against an attacker (who could rewrite the
marker as well), and it was the fastest checksum in the standard library here. Measured on this
machine (2.15 GB file read from the page cache in 16 MiB chunks, one core): zlib.crc32 2.96 GB/s,
adler32 2.28, sha1 1.46, sha256 1.28, blake2b 0.75, md5 0.60; the read alone 9.3 GB/s; torch.save
of the same file + sync 0.30 GB/s. A ViT-H checkpoint (632M parameters, bf16: 1.26 GB of module
weights + 3 x 2.53 GB of fp32 masters and Adam moments, about 8.9 GB) hashes in about 3.0 s on one
core, against about 30 s to write it at this disk's speed (10 %); split over 8 ranks that is about
0.4 s per rank (about 1 %). sha256 would take 2.3 times as long for no gain against damage.
"""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path
from typing import Optional

import torch

from mae_scale import faults

CHECKSUM = "crc32"
CHUNK = 16 << 20


def file_checksum(path: Path) -> tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of a file."""
    crc, size = 0, 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """Every rank's `obj`, on every rank (a collective; a list of one without a process group)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# -- the save side ---------------------------------------------------------------------------------

class SaveRecord:
    """What this rank's checkpoint engine wrote during one save: {path: (size, crc)} and the first
    error, if any. The error is kept instead of raised so that this rank keeps pace with the
    collectives the other ranks are still in (DeepSpeed's save ends in a barrier); the manager
    gathers every rank's record after the save and decides for all of them together."""

    def __init__(self, step: int):
        self.step = step
        self.files: dict[str, tuple[int, str]] = {}
        self.error: Optional[str] = None


def install_save_hook(engine) -> None:
    """Wrap the engine's checkpoint-engine `save` once: hash each file it writes into the current
    SaveRecord (`engine._mae_save_record`, set by the manager for the length of one save), and turn
    a failed write into the record's error after removing the partial file."""
    ce = engine.checkpoint_engine
    if getattr(ce, "_mae_hooked", False):
        return
    original = ce.save

    def save(state_dict, path):
        record: Optional[SaveRecord] = getattr(engine, "_mae_save_record", None)
        if record is None:  # a save outside CheckpointManager.save: behave as DeepSpeed would
            return original(state_dict, path)
        if record.error is not None:
            return None  # this rank already failed this save: write nothing more
        try:
            if faults.armed("enospc", record.step):
                with open(path, "wb") as fh:  # what a full disk leaves: a partial file
                    fh.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            original(state_dict, path)
            record.files[str(Path(path).resolve())] = file_checksum(Path(path))
        except Exception as exc:  # ENOSPC, EIO, EDQUOT, a pickling error: all fail the save
            record.error = out_of_space(Path(path)) or describe_error(exc)
            try:
                Path(path).unlink(missing_ok=True)
            except OSError:
                pass

    ce.save = save
    ce._mae_hooked = True


LOW_SPACE = 64 << 20


def out_of_space(path: Path) -> Optional[str]:
    """`No space left on device (...)` when the filesystem of `path` is (nearly) full, else None.
    Why ask: torch.save's zip writer reports a full disk as `RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos 3712 vs 3600`, without the errno (seen on a full tmpfs)."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free < min(LOW_SPACE, st.f_blocks * st.f_frsize // 10):  # small filesystems: a tenth counts as full
        return f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.1f} MiB left"
    return None


def describe_error(exc: BaseException) -> str:
    """One short line for an exception: `No space left on device` rather than `[Errno 28] ...: 'path'`."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def manifest(ckpt_dir: Path, records: list[dict]) -> dict[str, list]:
    """Rank 0: {file name: [size, crc]} for every file in `ckpt_dir`, from every rank's record,
    hashing here only what no rank recorded (the files DeepSpeed writes itself, e.g. zero_to_fp32.py)."""
    ckpt_dir = Path(ckpt_dir).resolve()
    files: dict[str, list] = {}
    for rec in records:
        for path, (size, crc) in rec.items():
            p = Path(path)
            if p.parent == ckpt_dir:
                files[p.name] = [size, crc]
    for child in sorted(ckpt_dir.iterdir()):
        if child.is_file() and child.name not in files and not child.name.startswith("COMPLETE"):
            files[child.name] = list(file_checksum(child))
    return files


# -- the load side ---------------------------------------------------------------------------------

def expected_files_without_manifest(marker: dict) -> list[str]:
    """Markers written before checksums were recorded: the files such a checkpoint must have."""
    world, stage = int(marker.get("world_size") or 1), int(marker.get("zero_stage") or 0)
    if stage == 3:
        names = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    else:
        names = ["mp_rank_00_model_states.pt"]
    return names


def check_files(ckpt_dir: Path, marker: dict, share: tuple[int, int] = (0, 1), checksums: bool = True) -> list[str]:
    """Problems with the files of one checkpoint (empty: all good), each one line naming the file.

    `share` = (index, count): check only every count-th file starting at index (ranks split the
    work). `checksums=False` checks presence and sizes only (instant; what `status` does by default).
    """
    ckpt_dir = Path(ckpt_dir)
    index, count = share
    problems = []
    files = marker.get("files")
    if files is None:  # an old-format marker: presence and non-emptiness is all we can check
        expected = expected_files_without_manifest(marker)
        if int(marker.get("zero_stage") or 0) > 0:
            optim = sorted(ckpt_dir.glob("*zero_pp_rank_*_optim_states.pt"))
            world = int(marker.get("world_size") or 1)
            if len(optim) < world:
                problems.append(f"{ckpt_dir / '*_optim_states.pt'}: {len(optim)} optimizer partition file(s) "
                                f"for world size {world}")
            expected += [p.name for p in optim]
        for name in sorted(expected)[index::count]:
            path = ckpt_dir / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif path.stat().st_size == 0:
                problems.append(f"{path} is empty")
        return problems
    for name in sorted(files)[index::count]:
        size, crc = files[name]
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        actual_size = path.stat().st_size
        if actual_size != size:
            problems.append(f"{path} has {actual_size} bytes, {size} were written (truncated or overwritten)")
        elif checksums and file_checksum(path)[1] != crc:
            problems.append(f"{path} does not match its {CHECKSUM} checksum (its bytes changed after it was written)")
    return problems


def check_collective(ckpt_dir: Path) -> list[str]:
    """`check_files` with the work split over the ranks; every rank gets the same sorted list of
    problems (a collective: call it on every rank). An unreadable marker is a problem too."""
    import json

    rank, world = _world()
    try:
        marker = json.loads((Path(ckpt_dir) / "COMPLETE").read_text())
        mine = check_files(ckpt_dir, marker, share=(rank, world))
    except Exception as exc:  # unreadable marker (bad JSON, I/O error): the same on every rank
        mine = [f"{Path(ckpt_dir) / 'COMPLETE'} cannot be read ({describe_error(exc)})"]
    return sorted(set(p for lst in all_gather(mine) for p in lst))
