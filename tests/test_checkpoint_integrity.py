"""A damaged checkpoint never loses the run and is never loaded silently; a save that fails (full
disk) leaves the previous checkpoint intact. Real DeepSpeed engines (world 1, in this process, ZeRO-1
bf16: a model-states file and an optimizer-partition file) and real files; the end-to-end tests at
the bottom run `mae-scale pretrain` / `export` / `status` as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_utils import _tensors, assert_same_checkpoint
from run_helpers import ROOT, base_overrides, run_env, run_pretrain
from mae_scale.checkpoint import (MARKER, CheckpointError, CheckpointManager, CheckpointSaveError,
                                  complete_checkpoints, install_safe_loader, latest_checkpoint, safe_torch_load)
from mae_scale.checkpoint.integrity import file_checksum

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"


def make_engine():
    import deepspeed

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64),
                          nn.GELU(), nn.Linear(64, 32))
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
              "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**12}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=config, dist_init_required=False)
    install_safe_loader(engine)
    return engine


def train(engine, start: int, end: int) -> None:
    """Steps start..end-1; each step's batch is a function of the step (so a resume can replay it)."""
    for step in range(start, end):
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(step)).bfloat16()
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()


def two_checkpoints(run: Path) -> CheckpointManager:
    """A run with complete checkpoints at steps 2 and 4."""
    ckpt = CheckpointManager(run, keep_last=2, is_main=True)
    engine = make_engine()
    for step in (2, 4):
        train(engine, step - 2, step)
        ckpt.save(engine, step, {"global_step": step}, world_size=1)
    return ckpt


def tensor_data_span(path: Path) -> tuple[int, int]:
    """(offset, length) in the file of the largest tensor's bytes (a stored, uncompressed zip member)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bytes_in_a_tensor(path: Path) -> None:
    offset, length = tensor_data_span(path)
    with open(path, "r+b") as fh:
        fh.seek(offset + length // 2)
        chunk = fh.read(4)
        fh.seek(offset + length // 2)
        fh.write(bytes(b ^ 0x5A for b in chunk))


def damage(ckpt_dir: Path, kind: str) -> None:
    if kind == "flipped":
        flip_bytes_in_a_tensor(ckpt_dir / OPTIM)
    elif kind == "truncated":
        path = ckpt_dir / MODEL
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "missing":
        (ckpt_dir / OPTIM).unlink()
    elif kind == "marker":
        (ckpt_dir / MARKER).write_text('{"step": 4, "files": {')  # cut off mid-write by a bad disk
    else:
        raise ValueError(kind)


def all_files(root: Path) -> dict:
    """{path under root, with a damaged_ prefix taken off: size} of every file (a move aside keeps all)."""
    return {str(p.relative_to(root)).removeprefix("damaged_"): p.stat().st_size
            for p in root.rglob("*") if p.is_file()}


def test_flipped_bytes_in_a_tensor_still_unpickle(world_of_one, tmp_path):
    """Why checksums at all: a few flipped bytes inside a tensor load without any error."""
    two_checkpoints(tmp_path / "run")
    path = tmp_path / "run/checkpoints/step_00000004" / OPTIM
    before = safe_torch_load(path)
    flip_bytes_in_a_tensor(path)
    after = safe_torch_load(path)  # no error from torch: the damage would be trained on
    a, b = {}, {}
    _tensors(before, "", a)
    _tensors(after, "", b)
    assert a.keys() == b.keys() and len(a) > 3
    assert [k for k in a if not torch.equal(a[k], b[k])], "the flip changed no tensor: no test"


@pytest.mark.parametrize("kind", ["flipped", "truncated", "missing", "marker"])
def test_damaged_newest_is_moved_aside_and_the_previous_resumes_exactly(world_of_one, tmp_path, kind, capsys):
    run = tmp_path / "run"
    ckpt = two_checkpoints(run)
    damage(run / "checkpoints/step_00000004", kind)
    files_before = all_files(run / "checkpoints")

    fallback = make_engine()
    ckpt_dir, state = ckpt.resume(fallback)
    assert ckpt_dir.name == "step_00000002" and state["global_step"] == 2
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if "is damaged" in x]
    assert len(line) == 1 and "step_00000004" in line[0] and "damaged_step_00000004" in line[0], out
    if kind != "marker":
        assert (OPTIM if kind in ("flipped", "missing") else MODEL) in line[0]
    # Moved aside, never deleted, and no longer a candidate.
    moved = run / "checkpoints/damaged_step_00000004"
    assert moved.is_dir() and "step_00000004" in (moved / "DAMAGED.txt").read_text()
    after = all_files(run / "checkpoints")
    after.pop("step_00000004/DAMAGED.txt")
    assert after == files_before
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2]
    ckpt.remove_incomplete()
    assert moved.is_dir()
    from launchers.slurm import status_report

    report, damaged = status_report(run)
    assert not damaged and "moved aside as damaged: damaged_step_00000004 (" in report, report

    # The fallback run ends bitwise where a run resumed directly from step 2 ends.
    train(fallback, 2, 6)
    CheckpointManager(tmp_path / "a", 2, True).save(fallback, 6, {}, 1)
    direct = make_engine()
    CheckpointManager(run, 2, True).load(direct, run / "checkpoints/step_00000002")
    train(direct, 2, 6)
    CheckpointManager(tmp_path / "b", 2, True).save(direct, 6, {}, 1)
    assert_same_checkpoint(latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b"))


def strip_checksums(ckpt_dir: Path) -> None:
    marker = json.loads((ckpt_dir / MARKER).read_text())
    marker.pop("files"), marker.pop("checksum")
    (ckpt_dir / MARKER).write_text(json.dumps(marker))


def test_old_format_marker_still_loads(world_of_one, tmp_path):
    run = tmp_path / "run"
    ckpt = two_checkpoints(run)
    for step in (2, 4):
        strip_checksums(run / f"checkpoints/step_{step:08d}")
    ckpt_dir, state = ckpt.resume(make_engine())
    assert ckpt_dir.name == "step_00000004" and state["global_step"] == 4


def test_old_format_half_loaded_then_previous_overwrites_it(world_of_one, tmp_path, capsys):
    """Without checksums a truncated optimizer file gets past the check: DeepSpeed loads the module
    weights of step 4, then fails on the optimizer. Loading step 2 must overwrite all of it."""
    run = tmp_path / "run"
    ckpt = two_checkpoints(run)
    newest = run / "checkpoints/step_00000004"
    strip_checksums(newest)
    path = newest / OPTIM
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    fallback = make_engine()
    fresh = {k: v.clone() for k, v in fallback.module.state_dict().items()}
    with pytest.raises(Exception):
        ckpt.load(fallback, newest)
    half = fallback.module.state_dict()
    assert any(not torch.equal(fresh[k], half[k]) for k in fresh), "the failed load changed nothing: no test"
    ckpt_dir, _ = ckpt.resume(fallback)
    assert ckpt_dir.name == "step_00000002"
    assert "could not be loaded" in capsys.readouterr().out
    train(fallback, 2, 6)
    CheckpointManager(tmp_path / "a", 2, True).save(fallback, 6, {}, 1)
    direct = make_engine()
    ckpt.load(direct, run / "checkpoints/step_00000002")
    train(direct, 2, 6)
    CheckpointManager(tmp_path / "b", 2, True).save(direct, 6, {}, 1)
    assert_same_checkpoint(latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b"))


def test_old_format_missing_partition_is_caught_before_loading(world_of_one, tmp_path):
    run = tmp_path / "run"
    ckpt = two_checkpoints(run)
    strip_checksums(run / "checkpoints/step_00000004")
    damage(run / "checkpoints/step_00000004", "missing")
    ckpt_dir, _ = ckpt.resume(make_engine())
    assert ckpt_dir.name == "step_00000002" and (run / "checkpoints/damaged_step_00000004").is_dir()


def test_code_in_a_checkpoint_is_refused_even_with_a_rewritten_marker(world_of_one, tmp_path, capsys):
    """Whoever swaps in a pickle that runs code may rewrite the marker too (CRC-32 is no signature):
    then the weights_only load is what refuses it, and the run falls back like for any damage."""
    import pickle

    from untrusted_files import WritesFileOnLoad

    run = tmp_path / "run"
    ckpt = two_checkpoints(run)
    newest = run / "checkpoints/step_00000004"
    proof = tmp_path / "code_ran"
    with open(newest / MODEL, "wb") as fh:
        pickle.dump({"module": WritesFileOnLoad(proof)}, fh)
    strip_checksums(newest)
    ckpt_dir, _ = ckpt.resume(make_engine())
    assert ckpt_dir.name == "step_00000002" and not proof.exists()
    assert "weights_only" in capsys.readouterr().out


def test_all_damaged_stops_in_one_line_and_deletes_nothing(world_of_one, tmp_path):
    run = tmp_path / "run"
    ckpt = two_checkpoints(run)
    damage(run / "checkpoints/step_00000004", "flipped")
    damage(run / "checkpoints/step_00000002", "truncated")
    files_before = all_files(run / "checkpoints")
    with pytest.raises(CheckpointError) as err:
        ckpt.resume(make_engine())
    message = str(err.value)
    assert "\n" not in message and "step_00000004" in message and "step_00000002" in message
    assert "nothing was deleted" in message
    after = all_files(run / "checkpoints")
    assert {k: v for k, v in after.items() if not k.endswith("DAMAGED.txt")} == files_before
    # The next start does not quietly begin again from step 0 either.
    again = CheckpointManager(run, 2, True)
    again.remove_incomplete()
    with pytest.raises(CheckpointError, match="moved aside as damaged"):
        again.resume(make_engine())
    assert len(all_files(run / "checkpoints")) == len(after)


def test_a_run_without_checkpoints_starts_fresh(world_of_one, tmp_path):
    assert CheckpointManager(tmp_path / "run", 2, True).resume(make_engine()) is None


def test_marker_records_every_file_with_its_checksum(world_of_one, tmp_path):
    run = tmp_path / "run"
    two_checkpoints(run)
    ckpt_dir = run / "checkpoints/step_00000004"
    marker = json.loads((ckpt_dir / MARKER).read_text())
    on_disk = sorted(p.name for p in ckpt_dir.iterdir() if p.name != MARKER)
    assert marker["checksum"] == "crc32" and sorted(marker["files"]) == on_disk and OPTIM in on_disk
    for name, (size, crc) in marker["files"].items():
        assert [size, crc] == list(file_checksum(ckpt_dir / name))


# -- save failures ----------------------------------------------------------------------------------

def _assert_failed_save_left_step_2(run: Path, err) -> None:
    message = str(err.value)
    assert "\n" not in message and "step_00000004" in message and "No space left on device" in message
    assert "resume from step 2" in message
    assert not (run / "checkpoints/step_00000004").exists()  # partial files gone
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2]
    ckpt_dir, state = CheckpointManager(run, 2, True).resume(make_engine())
    assert ckpt_dir.name == "step_00000002" and state["global_step"] == 2


@pytest.mark.parametrize("point", ["enospc", "marker_enospc"])
def test_injected_enospc_at_save(world_of_one, tmp_path, monkeypatch, point):
    run = tmp_path / "run"
    ckpt = CheckpointManager(run, keep_last=2, is_main=True)
    engine = make_engine()
    train(engine, 0, 2)
    ckpt.save(engine, 2, {"global_step": 2}, 1)
    train(engine, 2, 4)
    monkeypatch.setenv("MAE_SCALE_FAULT", f"{point}:4")
    with pytest.raises(CheckpointSaveError) as err:
        ckpt.save(engine, 4, {"global_step": 4}, 1)
    monkeypatch.delenv("MAE_SCALE_FAULT")
    _assert_failed_save_left_step_2(run, err)
    # The engine is still usable: a later save (space freed) succeeds.
    ckpt.save(engine, 4, {"global_step": 4}, 1)
    assert latest_checkpoint(run).name == "step_00000004"


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real filesystem that fills up: tmpfs, mounted here (needs root / CAP_SYS_ADMIN)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()

    def mount(size_bytes: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); test_injected_enospc_at_save covers it")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_real_full_disk_at_save(world_of_one, tmp_path, small_tmpfs):
    # One checkpoint's size, measured, decides the filesystem's: room for one and a half.
    probe = tmp_path / "probe"
    ckpt = CheckpointManager(probe, 2, True)
    engine = make_engine()
    train(engine, 0, 2)
    ckpt.save(engine, 2, {"global_step": 2}, 1)
    one = sum(p.stat().st_size for p in (probe / "checkpoints").rglob("*") if p.is_file())
    run = small_tmpfs(int(one * 1.5) + 8192) / "run"

    ckpt = CheckpointManager(run, keep_last=2, is_main=True)
    ckpt.save(engine, 2, {"global_step": 2}, 1)
    train(engine, 2, 4)
    with pytest.raises(CheckpointSaveError) as err:
        ckpt.save(engine, 4, {"global_step": 4}, 1)
    _assert_failed_save_left_step_2(run, err)


# -- export and status on a damaged checkpoint -----------------------------------------------------

def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mae_scale", *args], capture_output=True, text=True,
                          timeout=timeout, env=run_env(), cwd=ROOT)


def test_export_and_status_of_a_damaged_checkpoint_say_one_line(world_of_one, tmp_path):
    run = tmp_path / "run"
    two_checkpoints(run)
    damage(run / "checkpoints/step_00000004", "flipped")

    from mae_scale.errors import UserError
    from mae_scale.export import export_weights

    out = tmp_path / "x.safetensors"
    with pytest.raises(UserError) as err:
        export_weights(run, out)
    assert "\n" not in str(err.value) and OPTIM in str(err.value) and "checksum" in str(err.value)
    proc = _cli("export", str(run), "--out", str(out))
    assert proc.returncode == 2 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and OPTIM in lines[0] and "Traceback" not in proc.stderr, proc.stderr

    # status: sizes by default (the flip keeps the size), checksums with --verify
    quick = _cli("status", str(run))
    assert quick.returncode == 0, quick.stderr
    proc = _cli("status", str(run), "--verify")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    damaged = [x for x in proc.stdout.splitlines() if "damaged" in x]
    assert len(damaged) == 1 and OPTIM in damaged[0] and "step_00000004" in damaged[0], proc.stdout
    # A missing file is seen without --verify.
    damage(run / "checkpoints/step_00000004", "missing")
    proc = _cli("status", str(run))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert any(OPTIM in x and "missing" in x for x in proc.stdout.splitlines()), proc.stdout
    # An unreadable marker: one line too, no traceback.
    damage(run / "checkpoints/step_00000004", "marker")
    proc = _cli("status", str(run))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and MARKER in proc.stdout, proc.stdout
    proc = _cli("export", str(run / "checkpoints/step_00000004"), "--out", str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and MARKER in proc.stderr


# -- end to end through `mae-scale pretrain` (need the trainer to call CheckpointManager.resume and
# -- to report CheckpointError / CheckpointSaveError as one line) ---------------------------------

@pytest.fixture(scope="module")
def straight6(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight6") / "run"
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 6}))
    return out


def test_pretrain_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(small_shards, tmp_path, straight6):
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 4}))
    optim = sorted((out / "checkpoints/step_00000004").glob("*optim_states.pt"))
    flip_bytes_in_a_tensor(optim[0])
    proc = run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 6}))
    assert "step_00000004 is damaged" in proc.stdout and optim[0].name in proc.stdout, proc.stdout
    assert "resumed from" in proc.stdout and "step_00000002" in proc.stdout
    assert (out / "checkpoints/damaged_step_00000004" / optim[0].name).is_file()
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight6))
    attempts = [json.loads(x) for x in (out / "attempts.jsonl").read_text().splitlines()]
    assert [a["resumed_from_step"] for a in attempts] == [None, 2]


def test_pretrain_with_every_checkpoint_damaged_stops_in_one_line(small_shards, tmp_path):
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"train.max_steps": 4})
    run_pretrain(args)
    for ckpt_dir in (out / "checkpoints").glob("step_*"):
        flip_bytes_in_a_tensor(sorted(ckpt_dir.glob("*optim_states.pt"))[0])
    before = all_files(out / "checkpoints")
    metrics = (out / "metrics.jsonl").read_text()
    proc = run_pretrain(args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "could be loaded" in errors[0], proc.stderr
    after = all_files(out / "checkpoints")
    assert {k: v for k, v in after.items() if not k.endswith("DAMAGED.txt")} == before
    assert (out / "metrics.jsonl").read_text() == metrics  # never restarted from step 0


def test_pretrain_full_disk_at_save_stops_and_resumes_exactly(small_shards, tmp_path, straight6):
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"train.max_steps": 6})
    proc = run_pretrain(args, check=False, MAE_SCALE_FAULT="enospc:4")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "step 2" in errors[0], proc.stderr
    assert not (out / "checkpoints/step_00000004").exists()
    assert latest_checkpoint(out).name == "step_00000002"
    run_pretrain(args)
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight6))


@pytest.mark.distributed
def test_pretrain_world2_one_rank_full_disk_stops_every_rank(small_shards, tmp_path):
    out = tmp_path / "run"
    args = base_overrides(small_shards, out, **{"train.max_steps": 6, "train.zero_stage": 2})
    proc = run_pretrain(args, nproc=2, check=False, timeout=300, MAE_SCALE_FAULT="enospc:4", MAE_SCALE_FAULT_RANK="1")
    assert proc.returncode != 0, proc.stderr
    assert "No space left on device" in proc.stderr
    assert not (out / "checkpoints/step_00000004").exists()
    assert latest_checkpoint(out).name == "step_00000002"
    resumed = run_pretrain(args, nproc=2)
    assert "step_00000002" in resumed.stdout and latest_checkpoint(out).name == "step_00000006"


@pytest.mark.distributed
def test_pretrain_world2_damage_in_rank1s_partition_is_every_ranks(small_shards, tmp_path):
    """Rank 1's optimizer file is checked by rank 1 (ranks split the files); its verdict must move
    every rank to the previous checkpoint, and the run ends where a straight run ends."""
    extra = {"train.zero_stage": 2}
    straight = tmp_path / "straight"
    run_pretrain(base_overrides(small_shards, straight, **extra, **{"train.max_steps": 6}), nproc=2)
    out = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, out, **extra, **{"train.max_steps": 4}), nproc=2)
    rank1 = sorted((out / "checkpoints/step_00000004").glob("*rank_1_*optim_states.pt"))
    assert len(rank1) == 1
    flip_bytes_in_a_tensor(rank1[0])
    proc = run_pretrain(base_overrides(small_shards, out, **extra, **{"train.max_steps": 6}), nproc=2)
    assert rank1[0].name in proc.stdout and "resumed from" in proc.stdout, proc.stdout
    assert (out / "checkpoints/damaged_step_00000004").is_dir()
    assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(straight))
