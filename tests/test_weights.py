"""Initializing models from published / exported weights: the official release's file layout into a
real ViT-B/16 (fine-tuning and continued pretraining), position-table resizing, and the refusals:
files that are not weights, pickles that would run code, weights of another model size, a file
missing an encoder key."""

import argparse
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from untrusted_files import WritesFileOnLoad
from mae_scale.models import build_mae
from mae_scale.weights import WeightsError, adapt_to_model, load_init, read_state_dict

DECODER = ("decoder_", "mask_token")


def _encoder(mae) -> dict:
    return {k: v.clone() for k, v in mae.state_dict().items() if not k.startswith(DECODER)}


def _timm_vit(name="vit_base_patch16_224", **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


@pytest.fixture(scope="module")
def mae_base():
    torch.manual_seed(0)
    return build_mae("mae_vit_base_patch16")


@pytest.fixture(scope="module")
def official_base_file(mae_base, tmp_path_factory) -> Path:
    """The published layout: {"model": encoder state dict}, as mae_pretrain_vit_base.pth ships."""
    path = tmp_path_factory.mktemp("official") / "mae_pretrain_vit_base.pth"
    torch.save({"model": _encoder(mae_base)}, path)
    return path


# ---------------------------------------------------------------------- real ViT-B/16
def test_official_encoder_into_timm_vit_b_for_finetuning(mae_base, official_base_file):
    vit = _timm_vit(num_classes=10, global_pool="avg")
    report = load_init(vit, official_base_file, kind="finetune")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.dropped) == ["norm.bias", "norm.weight"]  # avg pooling uses fc_norm, as MAE fine-tunes
    assert not report.resized
    loaded = vit.state_dict()
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight"):
        assert torch.equal(loaded[key], mae_base.state_dict()[key]), key


def test_official_encoder_into_mae_for_continued_pretraining(mae_base, official_base_file, tmp_path):
    torch.manual_seed(1)
    fresh = build_mae("mae_vit_base_patch16")
    decoder_before = fresh.decoder_blocks[0].attn.qkv.weight.clone()
    report = load_init(fresh, official_base_file, kind="pretrain")
    assert report.missing and all(k.startswith(DECODER) for k in report.missing)
    assert "mask_token" in report.missing and "decoder_pred.weight" in report.missing
    assert not report.dropped
    assert torch.equal(fresh.blocks[3].attn.qkv.weight, mae_base.blocks[3].attn.qkv.weight)
    assert torch.equal(fresh.decoder_blocks[0].attn.qkv.weight, decoder_before)  # stays as initialized

    # With the decoder in the file (the official visualize checkpoints, or our --with-decoder export):
    # nothing stays new.
    full = tmp_path / "with_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in mae_base.state_dict().items()}, str(full))
    torch.manual_seed(2)
    again = build_mae("mae_vit_base_patch16")
    report = load_init(again, full, kind="pretrain")
    assert report.missing == [] and report.dropped == []
    assert torch.equal(again.decoder_pred.weight, mae_base.decoder_pred.weight)


def test_vit_large_weights_into_vit_base_name_the_first_mismatch(tmp_path):
    with torch.device("meta"):
        large = build_mae("mae_vit_large_patch16")
    # Real tensors with ViT-L's shapes, one stored element each (expand), so the file stays tiny.
    sd = {k: torch.zeros(()).expand(v.shape) for k, v in large.state_dict().items() if not k.startswith(DECODER)}
    path = tmp_path / "mae_pretrain_vit_large.pth"
    torch.save({"model": sd}, path)
    vit = _timm_vit(num_classes=0)
    with pytest.raises(WeightsError) as err:
        load_init(vit, path, kind="finetune")
    message = str(err.value)
    assert "cls_token" in message and "(1, 1, 1024)" in message and "(1, 1, 768)" in message
    assert "vit_large_patch16" in message and "\n" not in message


def test_official_finetuned_checkpoint_keeps_what_fits(tmp_path):
    # A fine-tuned checkpoint (fc_norm + a 1000-class head, no final norm), as MAE's fine-tuning saves.
    tuned = _timm_vit("vit_tiny_patch16_224", num_classes=1000, img_size=64, depth=4, global_pool="avg")
    path = tmp_path / "mae_finetuned_vit_tiny.pth"
    torch.save({"model": tuned.state_dict()}, path)
    ten_classes = _timm_vit("vit_tiny_patch16_224", num_classes=10, img_size=64, depth=4, global_pool="avg")
    report = load_init(ten_classes, path, kind="finetune")
    assert sorted(report.missing) == ["head.bias", "head.weight"] and sorted(report.dropped) == ["head.bias", "head.weight"]
    assert torch.equal(ten_classes.fc_norm.weight, tuned.fc_norm.weight)
    same_classes = _timm_vit("vit_tiny_patch16_224", num_classes=1000, img_size=64, depth=4, global_pool="avg")
    report = load_init(same_classes, path, kind="finetune")
    assert report.missing == [] and torch.equal(same_classes.head.weight, tuned.head.weight)


def test_linear_probe_head_with_batchnorm_starts_new(tmp_path):
    mae = build_mae("mae_vit_tiny_patch16", img_size=64)
    path = tmp_path / "tiny.pth"
    torch.save({"model": _encoder(mae)}, path)
    probe = _timm_vit("vit_tiny_patch16_224", num_classes=4, img_size=64, depth=4)  # cls token + final norm
    probe.head = torch.nn.Sequential(torch.nn.BatchNorm1d(192, affine=False, eps=1e-6), probe.head)  # as MAE probes
    report = load_init(probe, path, kind="linprobe")
    assert sorted(report.missing) == ["head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var",
                                      "head.1.bias", "head.1.weight"]
    assert report.dropped == [] and torch.equal(probe.norm.weight, mae.norm.weight)


# ---------------------------------------------------------------------- position tables
def test_pos_embed_resized_to_a_larger_grid_keeps_the_cls_slot(tmp_path):
    torch.manual_seed(0)
    mae = build_mae("mae_vit_tiny_patch16", img_size=64)  # 4x4 grid
    sd = _encoder(mae)
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])  # learned-looking, so cls and layout matter
    path = tmp_path / "tiny.pth"
    torch.save({"model": sd}, path)
    vit = _timm_vit("vit_tiny_patch16_224", num_classes=5, img_size=128, depth=4, global_pool="avg")  # 8x8
    report = load_init(vit, path, kind="finetune")
    assert report.resized == {"pos_embed": ((1, 17, 192), (1, 65, 192))}
    got = vit.pos_embed.detach()
    assert torch.equal(got[:, :1], sd["pos_embed"][:, :1])
    grid = sd["pos_embed"][0, 1:].reshape(4, 4, 192).permute(2, 0, 1)[None]  # [1, D, rows, cols]
    expect = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(64, 192)
    torch.testing.assert_close(got[0, 1:], expect)

    # Continued pretraining at another size keeps the MAE model's own exact sin-cos tables.
    mae128 = build_mae("mae_vit_tiny_patch16", img_size=128)
    table = mae128.pos_embed.detach().clone()
    report = load_init(mae128, path, kind="pretrain")
    assert sorted(report.kept_from_model) == ["pos_embed"] and torch.equal(mae128.pos_embed, table)


# ---------------------------------------------------------------------- reading and refusals
def test_pickles_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "evil.pth", tmp_path / "evil_legacy.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": WritesFileOnLoad(marker)}, zipped)
    with open(legacy, "wb") as fh:
        pickle.dump({"model": WritesFileOnLoad(marker)}, fh)
    for path in (zipped, legacy):
        with pytest.raises(WeightsError, match="refused to unpickle") as err:
            read_state_dict(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_files_that_are_not_weights_are_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match="not a PyTorch weights file") as err:
        read_state_dict(text)
    assert "notes.pth" in str(err.value)
    fake = tmp_path / "notes.safetensors"
    fake.write_text("nope")
    with pytest.raises(WeightsError, match="notes.safetensors"):
        read_state_dict(fake)
    no_tensors = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "args": {"lr": 1e-3}}, no_tensors)
    with pytest.raises(WeightsError, match="holds no tensors"):
        read_state_dict(no_tensors)
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(WeightsError, match="no complete checkpoint"):
        read_state_dict(tmp_path / "run")


def test_training_checkpoints_with_extra_keys_and_argparse_args_load(tmp_path):
    sd = {"w": torch.arange(4.0), "b": torch.ones(2)}
    plain = tmp_path / "plain.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "epoch": 799}, plain)
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    # MAE's own training code saves its command line as an argparse.Namespace next to the weights.
    with_args = tmp_path / "with_args.pth"
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16", lr=None)},
               with_args)
    for path in (plain, bare, with_args):
        got = read_state_dict(path)
        assert set(got) == {"w", "b"} and torch.equal(got["w"], sd["w"]), path


def test_a_file_missing_an_encoder_key_is_refused(tmp_path):
    mae = build_mae("mae_vit_tiny_patch16", img_size=64)
    sd = _encoder(mae)
    del sd["blocks.0.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    for model, kind in ((build_mae("mae_vit_tiny_patch16", img_size=64), "pretrain"),
                        (_timm_vit("vit_tiny_patch16_224", num_classes=3, img_size=64, depth=4), "linprobe")):
        with pytest.raises(WeightsError, match="blocks.0.attn.qkv.weight"):
            load_init(model, path, kind=kind)
    with pytest.raises(WeightsError, match="unknown init kind"):
        adapt_to_model(sd, mae, kind="distill")


@pytest.mark.distributed
def test_a_run_directory_is_consolidated_by_rank0_only_and_shared(small_shards, tmp_path):
    """Two ranks initializing from a run directory: one ZeRO merge (rank 0's), the same weights on
    both (equal to a plain read), no scratch file left, and a failure on either rank raised on both
    (a hang here would time the test out)."""
    import json
    import subprocess
    import sys

    from run_helpers import ROOT, base_overrides, run_env, run_pretrain

    run = tmp_path / "run"
    run_pretrain(base_overrides(small_shards, run, **{"train.max_steps": 2, "train.zero_stage": 2}), nproc=2)
    empty, scratch, out = tmp_path / "empty", tmp_path / "scratch", tmp_path / "out"
    for d in (empty, scratch, out):
        d.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/read_once_check.py"), str(run), str(empty), str(scratch), str(out)],
                          capture_output=True, text=True, timeout=300, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    plain = read_state_dict(run)
    from read_once_check import digest

    assert ranks[0]["digest"] == ranks[1]["digest"] == digest(plain) and ranks[0]["keys"] == len(plain)
    assert ranks[0]["consolidations"] == [str(run), str(empty), str(run)] and ranks[1]["consolidations"] == []
    assert ranks[0]["scratch_left"] == ranks[1]["scratch_left"] == [] and not list(scratch.iterdir())
    assert ranks[0]["error"] == ranks[1]["error"] and str(empty) in ranks[0]["error"]
    # rank 1 failing to read rank 0's file: both raise (rank 1 saying why), nothing left behind
    assert "rank 1 could not read" in ranks[1]["read_error"] and "injected" in ranks[1]["read_error"]
    assert "another rank could not read" in ranks[0]["read_error"]
    assert ranks[0]["scratch_after_failure"] == []
