"""Unsafe tar members (counted, never written or followed) and a loader worker killed from
outside (one LoaderWorkerDied line), with real tar files and real worker processes."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from data_pipeline import LoaderWorkerDied, MAEAugment, make_loader, resolve_shards, verify_shards
from data_pipeline import write_shards
from data_pipeline.eval_stream import make_eval_loader
from data_pipeline.finetune_augment import EvalTransform
from batch_asserts import keys_of

SIZE = 32


def _member(name: str, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, (io.BytesIO(data) if ti.isfile() else None)


def test_unsafe_members_are_counted_and_never_written(sample_dir: Path, tmp_path: Path):
    jpgs = sorted((sample_dir / "train").glob("*/*.JPEG"))
    outside = tmp_path / "outside.jpg"  # a real image a followed link would decode
    outside.write_bytes(jpgs[0].read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    tar = work / "hand-000000.tar"
    members = [
        _member("good0.jpg", jpgs[1].read_bytes()), _member("good0.cls", b"0"),
        _member("../escape.jpg", jpgs[2].read_bytes()),
        _member(f"{tmp_path}/absolute.jpg", jpgs[3].read_bytes()),
        _member("good1.jpg", jpgs[4].read_bytes()), _member("good1.cls", b"1"),
        _member("symlink.jpg", type=tarfile.SYMTYPE, linkname=str(outside)),
        _member("hardlink.jpg", type=tarfile.LNKTYPE, linkname="good0.jpg"),
        _member("device.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
        _member("fifo.jpg", type=tarfile.FIFOTYPE),
        _member("mixed.jpg", jpgs[5].read_bytes()),  # a good image, but its label is a link
        _member("mixed.cls", type=tarfile.SYMTYPE, linkname="/etc/hostname"),
        _member("subdir", type=tarfile.DIRTYPE),  # a directory is no sample at all
        _member("good2.jpg", jpgs[6].read_bytes()), _member("good2.cls", b"2"),
    ]
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, f in members:
            tf.addfile(ti, f)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cwd = Path.cwd()

    ss = resolve_shards([str(tar)])  # no manifest: counted by reading
    assert ss.counts == (10,)  # 3 good + 7 unsafe samples; the directory is not one
    ld = make_loader(ss, 2, input_size=SIZE, max_bad_fraction=0.9, shuffle_buffer=1)
    batches = list(ld)
    assert dict(ld.bad_counts) == {"unsafe_member": 7}
    assert set(keys_of(batches)) == {"good0", "good1", "good2"}
    ev = make_eval_loader(ss, 4, transform=EvalTransform(SIZE))
    assert sorted(keys_of(list(ev))) == ["good0", "good1", "good2"]
    assert dict(ev.bad_counts) == {"unsafe_member": 7}

    # verify names every unsafe sample and reads nothing out of the tar either
    write_shards(sample_dir, tmp_path / "sh", samples_per_shard=8, progress=False)
    (tmp_path / "sh" / "train-000000.tar").write_bytes(tar.read_bytes())
    problems = verify_shards(tmp_path / "sh")
    assert sum("unsafe tar member" in p for p in problems) == 7
    assert any("symbolic link" in p for p in problems) and any("device" in p for p in problems)

    # nothing was written anywhere by any of it
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "absolute.jpg").exists()
    assert not Path("/escape.jpg").exists() and Path.cwd() == cwd
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                   if not p.is_relative_to(tmp_path / "sh"))
    assert after == before


class _SlowAugment:
    """The real MAE augmentation, slowed down so the workers are still busy when one is
    killed (at module level: a worker gets it through fork)."""

    def __init__(self) -> None:
        self.aug = MAEAugment(SIZE)

    def __call__(self, data, gen):
        time.sleep(0.05)
        return self.aug(data, gen)


def _kill_a_worker() -> int:
    workers = [p for p in psutil.Process().children() if p.is_running()]
    assert workers, "no loader worker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)  # what the out-of-memory killer does
    return workers[-1].pid


@pytest.mark.parametrize("eval_stream", [False, True])
def test_killed_worker_ends_with_one_line(shard_dir: Path, eval_stream: bool):
    if eval_stream:
        ld = make_eval_loader(shard_dir, 2, num_workers=2, transform=_SlowAugment())
    else:
        ld = make_loader(shard_dir, 2, num_workers=2, augment=_SlowAugment())
    it = iter(ld)
    next(it)
    with pytest.raises(LoaderWorkerDied) as e:
        pid = _kill_a_worker()
        for _ in it:  # the dead worker's next batch never comes
            pass
    msg = str(e.value)
    assert "\n" not in msg and "data.num_workers" in msg and "memory" in msg
    assert str(pid) in msg and "Killed" in msg  # names the process and the signal
    it.close()
    # the loader works again afterwards (fresh workers)
    assert len(keys_of(list(ld))) > 0
