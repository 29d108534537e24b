"""The pretraining monitor (mae_scale.train.monitor): a held-out loss that depends only on the
weights (not on the batch size, the world size or the run), a curve that resumes without gaps or
duplicates, and a run whose training is bitwise the same with the monitor on or off."""

import json
import math

import pytest
import torch

from run_helpers import SMOKE, base_overrides, run_pretrain
from mae_scale.config import load_config
from mae_scale.config_load import ConfigError
from mae_scale.distributed import DistEnv
from mae_scale.objectives import OBJECTIVES
from mae_scale.train.monitor import Monitor

HELDOUT = 40  # samples: uneven over 2 ranks and over batches of 8 or 16


def _monitor(objective: str, shards, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
    name = "mae_vit_tiny_patch16" if objective == "mae" else "vit_tiny_patch16"
    mim = [] if objective == "mae" else ["model.mask_ratio=0.5", "model.mask_patch_size=32"]
    cfg = load_config(SMOKE, [f"model.objective={objective}", f"model.name={name}", "data.input_size=64", *mim,
                              f"data.val_shards={shards}", "monitor.every_steps=1", f"monitor.val_samples={HELDOUT}",
                              f"monitor.batch_size={batch_size}"], scope="plan")
    built = OBJECTIVES[objective](cfg)
    torch.manual_seed(seed)
    model = built.build_model()
    return Monitor(cfg, DistEnv(rank, world_size, rank, torch.device("cpu")), built), model


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_heldout_loss_depends_only_on_the_weights(objective, small_shards):
    monitor, model = _monitor(objective, small_shards, batch_size=8)
    first = monitor.measure(model, heldout=True, knn=False)
    assert first["heldout_samples"] == HELDOUT and math.isfinite(first["heldout_loss"])
    assert monitor.measure(model, heldout=True, knn=False)["heldout_loss"] == first["heldout_loss"]  # fixed masks
    other_batches, _ = _monitor(objective, small_shards, batch_size=16)
    assert other_batches.measure(model, True, False)["heldout_loss"] == pytest.approx(first["heldout_loss"], rel=1e-6)
    _, other_weights = _monitor(objective, small_shards, batch_size=8, seed=1)
    assert monitor.measure(other_weights, True, False)["heldout_loss"] != first["heldout_loss"]
    assert model.training  # the model's mode is given back


def _ws2_worker(rank: int, store: str, shards: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A FileStore rendezvous: no port and no environment variable, in this process or the parent.
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    monitor, model = _monitor("mae", shards, batch_size=8, rank=rank, world_size=2)
    with open(f"{out_dir}/{rank}.json", "w") as fh:
        json.dump(monitor.measure(model, heldout=True, knn=False), fh)
    from mae_scale.distributed import exit_process, shutdown_distributed

    shutdown_distributed()
    exit_process(0)  # no interpreter finalization after gloo (see mae_scale.distributed)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_heldout_loss_is_the_same_at_world_size_2(small_shards, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ws2_worker, args=(str(tmp_path / "store"), str(small_shards), str(tmp_path)), nprocs=2, join=True)
    monitor, model = _monitor("mae", small_shards, batch_size=8)
    expected = monitor.measure(model, heldout=True, knn=False)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["heldout_samples"] == HELDOUT  # each sample counted once over the ranks
        assert got["heldout_loss"] == pytest.approx(expected["heldout_loss"], rel=1e-6), rank


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    monitor = [{k: v for k, v in r.items() if k != "monitor_s"} for r in rows if "monitor_s" in r]
    return losses, monitor


@pytest.mark.timeout(900)
def test_monitor_curve_resumes_and_training_is_unchanged(small_shards, tmp_path):
    mon = [f"data.val_shards={small_shards}", "monitor.every_steps=2", f"monitor.val_samples={HELDOUT}",
           "monitor.knn_every_steps=4", f"monitor.knn_train_shards={small_shards}",
           f"monitor.knn_val_shards={small_shards}", "monitor.knn_train_samples=64", "monitor.knn_val_samples=24"]
    run_pretrain(base_overrides(small_shards, tmp_path / "off", **{"train.max_steps": 4}))
    run_pretrain(base_overrides(small_shards, tmp_path / "on", **{"train.max_steps": 4}) + mon)
    run_pretrain(base_overrides(small_shards, tmp_path / "resumed", **{"train.max_steps": 2}) + mon)
    run_pretrain(base_overrides(small_shards, tmp_path / "resumed", **{"train.max_steps": 4}) + mon)

    off, _ = _rows(tmp_path / "off")
    on, on_monitor = _rows(tmp_path / "on")
    resumed, resumed_monitor = _rows(tmp_path / "resumed")
    assert on == off and resumed == off  # the monitor never changes what is trained
    assert [(r["step"], "knn_top1_cls" in r) for r in on_monitor] == [(0, True), (2, False), (4, True)]
    # the first part ended at step 2, and a run's end is measured in full: k-NN there too
    assert [(r["step"], "knn_top1_cls" in r) for r in resumed_monitor] == [(0, True), (2, True), (4, True)]
    # no point missing or repeated, the same figures after the resume
    assert [r["heldout_loss"] for r in resumed_monitor] == [r["heldout_loss"] for r in on_monitor]
    assert resumed_monitor[0] == on_monitor[0] and resumed_monitor[-1] == on_monitor[-1]
    assert 0 <= on_monitor[-1]["knn_top1_mean"] <= 100 and on_monitor[-1]["knn_samples"] == 24
    assert (tmp_path / "on" / "monitor.png").stat().st_size > 0
    assert not (tmp_path / "off" / "monitor.png").exists()


def test_one_set_split_into_queries_and_bank(small_shards):
    """Without knn_val_shards the k-NN splits knn_train_shards: the first knn_val_samples are the
    queries, the bank the knn_train_samples after them; over 2 ranks each sample is read once."""
    from data_pipeline.eval_stream import make_eval_loader
    from data_pipeline.finetune_augment import EvalTransform

    def keys(limit, offset):
        out = []
        for rank in (0, 1):
            loader = make_eval_loader(small_shards, 7, rank=rank, world_size=2, transform=EvalTransform(32),
                                      limit=limit, offset=offset)
            out += [k for batch in loader for k in batch["key"]]
        return out

    everything = keys(None, 0)
    queries, bank = keys(24, 0), keys(64, 24)
    assert queries == everything[:24] and bank == everything[24:88]  # disjoint, in order, none twice
    assert keys(1000, 120) == everything[120:]  # a limit past the end stops at the end

    monitor, model = _monitor("mae", small_shards, batch_size=8)
    mon = monitor.mon
    mon.knn_train_shards, mon.knn_val_shards, mon.knn_train_samples, mon.knn_val_samples = str(small_shards), "", 64, 24
    row = monitor.measure(model, heldout=False, knn=True)
    assert row["knn_samples"] == 24 and 0 <= row["knn_top1_cls"] <= 100
    with pytest.raises(ConfigError, match="all of them k-NN queries"):
        load_config(SMOKE, ["monitor.knn_every_steps=10", f"monitor.knn_train_shards={small_shards}",
                            "monitor.knn_val_samples=128"])


@pytest.mark.parametrize("overrides,words", [
    (["monitor.every_steps=100"], "monitor.every_steps=100 needs data.val_shards"),
    (["monitor.knn_every_steps=100"], "monitor.knn_every_steps=100 needs monitor.knn_train_shards"),
    (["monitor.every_steps=100", "data.val_shards=/nope"], "data.val_shards"),
])
def test_monitor_settings_are_checked_before_the_run(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert words in str(err.value) and "\n" not in str(err.value)
