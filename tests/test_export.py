"""`mae-scale export` on real pretraining checkpoints: the exported fp32 weights are the run's fp32
master weights (for ZeRO-0, -2 and -3, at world 1 and 2), the encoder-only file loads strictly into
timm's VisionTransformer and computes what our MAE encoder computes, and --with-decoder loads back
into the MAE model."""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from run_helpers import ROOT, base_overrides, run_env, run_pretrain
from mae_scale.checkpoint import latest_checkpoint, safe_torch_load
from mae_scale.cli.tools import add_export_parser
from mae_scale.export import export_weights
from mae_scale.models import VIT_ARCHS, build_mae, get_2d_sincos_pos_embed

# (ZeRO stage, precision, world size): ZeRO-0 bf16 keeps unnamed fp32 masters in its model-states
# file; ZeRO-2 bf16 and ZeRO-3 fp32 at world 2 split them over two ranks' files.
CASES = [(0, "bf16", 1), (2, "bf16", 2), (3, "fp32", 2)]
FROZEN = ("pos_embed", "decoder_pos_embed")


@pytest.fixture(scope="module")
def pretrained(small_shards, tmp_path_factory):
    """case -> run directory of a 2-step tiny pretraining run; each case is run once per module."""
    runs = {}

    def run(case):
        if case not in runs:
            zero, precision, nproc = case
            out = tmp_path_factory.mktemp(f"export_z{zero}_{precision}_w{nproc}") / "run"
            run_pretrain(base_overrides(small_shards, out, **{"train.max_steps": 2, "train.zero_stage": zero,
                                                               "train.precision": precision}), nproc=nproc)
            runs[case] = out
        return runs[case]

    return run


def _ids(cases):
    return [f"zero{z}-{p}-world{n}" for z, p, n in cases]


def _deepspeed_fp32(ckpt):
    """Oracle for ZeRO >= 1: DeepSpeed's own consolidation (its unsafe loader, on files we wrote)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_export_equals_fp32_master_weights(pretrained, tmp_path, case):
    run, (zero, precision, _) = pretrained(case), case
    ckpt = latest_checkpoint(run)
    summary = export_weights(run, tmp_path / "full.safetensors", with_decoder=True)
    assert summary["step"] == 2 and summary["zero_stage"] == zero and summary["checkpoint"] == str(ckpt)
    full = load_file(str(tmp_path / "full.safetensors"))
    assert all(t.dtype == torch.float32 for t in full.values())
    trainable = [k for k in full if k not in FROZEN]

    if zero >= 1:
        oracle = _deepspeed_fp32(ckpt)
        differ = [k for k in trainable if not torch.equal(full[k], oracle[k].float())]
        assert not differ, f"exported weights differ from DeepSpeed's fp32 merge: {differ[:3]}"
    else:
        # ZeRO-0 bf16: the masters are unnamed in the file; every exported trainable tensor must be
        # exactly one of them, and the set must be complete.
        states = safe_torch_load(ckpt / "mp_rank_00_model_states.pt")
        masters = [t for group in states["optimizer"]["fp32_groups"] for t in group]
        assert len(masters) == len(trainable)
        unmatched = [k for k in trainable if not any(m.shape == full[k].shape and torch.equal(m, full[k])
                                                     for m in masters)]
        assert not unmatched, f"not fp32 masters: {unmatched[:3]}"
        module = states["module"]
        assert all(torch.equal(full[k].to(torch.bfloat16), module[k]) for k in trainable)

    if precision == "bf16":
        # The fp32 export is finer than the bf16 module copy: taking that copy would fail here.
        module_file = next(ckpt.glob("*model_states.pt"))
        module = safe_torch_load(module_file)["module"]
        w = "blocks.0.attn.qkv.weight"
        if module[w].numel():  # ZeRO-3 module files hold placeholders
            assert not torch.equal(full[w], module[w].float())

    # The frozen sin-cos tables are MAE's exact ones, not bf16-rounded copies.
    for key in FROZEN:
        exact = get_2d_sincos_pos_embed(full[key].shape[-1], 4, cls_token=True).float().unsqueeze(0)
        assert torch.equal(full[key], exact), key


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_encoder_export_runs_in_timm_like_our_encoder(pretrained, tmp_path, case):
    import timm

    run, zero = pretrained(case), case[0]
    summary = export_weights(run, tmp_path / "encoder.safetensors")
    export_weights(run, tmp_path / "full.safetensors", with_decoder=True)
    encoder = load_file(str(tmp_path / "encoder.safetensors"))
    assert not any(k.startswith(("decoder_", "mask_token")) for k in encoder)
    assert summary["keys"] == len(encoder) and summary["params"] == sum(t.numel() for t in encoder.values())
    with safe_open(str(tmp_path / "encoder.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "timm-vit" and meta["step"] == "2" and meta["model"] == "mae_vit_tiny_patch16"
    assert meta["source_checkpoint"] == str(latest_checkpoint(run))

    arch = VIT_ARCHS["vit_tiny_patch16"]  # timm's vit_tiny has 12 blocks; ours has 4
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64,
                            depth=arch.depth, embed_dim=arch.embed_dim, num_heads=arch.num_heads)
    vit.load_state_dict(encoder, strict=True)
    mae = build_mae("mae_vit_tiny_patch16", img_size=64)
    mae.load_state_dict(load_file(str(tmp_path / "full.safetensors")), strict=True)  # --with-decoder round trip

    # A run directory as fine-tuning's init: consolidated in memory, the new head and fc_norm stay new.
    from mae_scale.weights import load_init

    classifier = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=64,
                                   depth=arch.depth, global_pool="avg")
    report = load_init(classifier, run, kind="finetune")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.equal(classifier.blocks[2].mlp.fc1.weight, encoder["blocks.2.mlp.fc1.weight"])

    vit.eval(), mae.eval()
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(zero))
    num_patches = mae.patch_embed.num_patches
    with torch.no_grad():
        ours, mask, _ = mae.forward_encoder(imgs, mask_ratio=0.0, noise=torch.arange(num_patches).float().expand(2, -1))
        theirs = vit.forward_features(imgs)
    assert mask.sum() == 0 and ours.shape == theirs.shape == (2, 1 + num_patches, arch.embed_dim)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
def test_export_verb_and_refusal(tmp_path, pretrained):
    run = pretrained(CASES[1])
    entry = ["-m", "mae_scale"]  # the mae-scale CLI
    out = tmp_path / "w.safetensors"
    proc = subprocess.run([sys.executable, *entry, "export", str(run), "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "step 2" in lines[0] and str(out) in lines[0], proc.stdout
    encoder_keys = {k for k in build_mae("mae_vit_tiny_patch16", img_size=64).state_dict()
                    if not k.startswith(("decoder_", "mask_token"))}
    assert set(load_file(str(out))) == encoder_keys

    # A run directory without a complete checkpoint: one line, exit 2, nothing written.
    empty = tmp_path / "no_ckpt_run"
    (empty / "checkpoints/step_00000004").mkdir(parents=True)  # a cut-off save: no COMPLETE marker
    bad_out = tmp_path / "never.safetensors"
    proc = subprocess.run([sys.executable, *entry, "export", str(empty), "--out", str(bad_out)], capture_output=True,
                          text=True, timeout=300, env=run_env(), cwd=ROOT)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no complete checkpoint" in proc.stderr, proc.stderr
    assert not bad_out.exists()


def test_export_parser_shape():
    import argparse

    parser = argparse.ArgumentParser(prog="mae-scale")
    add_export_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["export", "runs/x", "--out", "x.safetensors", "--with-decoder"])
    assert (args.src, args.out, args.with_decoder) == ("runs/x", "x.safetensors", True) and callable(args.run)
    assert parser.parse_args(["export", "runs/x", "--out", "y.safetensors"]).with_decoder is False


@pytest.mark.distributed
def test_a_checkpoint_missing_a_rank_file_is_refused(tmp_path, pretrained):
    import shutil

    from mae_scale.errors import UserError

    ckpt = latest_checkpoint(pretrained(CASES[1]))  # ZeRO-2, world 2: one optimizer file per rank
    copy = tmp_path / "run/checkpoints" / ckpt.name
    shutil.copytree(ckpt, copy)
    rank1 = sorted(copy.glob("*rank_1_*optim_states.pt"))
    assert len(rank1) == 1
    rank1[0].unlink()
    with pytest.raises(UserError, match="optim_states") as err:
        export_weights(copy, tmp_path / "x.safetensors")
    assert "\n" not in str(err.value) and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("mae_name,timm_name", [("mae_vit_base_patch16", "vit_base_patch16_224"),
                                                ("mae_vit_large_patch16", "vit_large_patch16_224"),
                                                ("mae_vit_huge_patch14", "vit_huge_patch14_224")])
def test_every_published_size_exports_timm_names_and_shapes(mae_name, timm_name):
    """What `export` keeps of each MAE size is exactly timm's model of that name (keys and shapes)."""
    import timm

    from mae_scale.export import encoder_only

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in encoder_only(build_mae(mae_name).state_dict()).items()}
        theirs = {k: tuple(v.shape) for k, v in timm.create_model(timm_name, num_classes=0).state_dict().items()}
    assert ours == theirs
