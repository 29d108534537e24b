"""The bench's baseline switch changes speed, not results: in fp32, the official-style step (explicit
softmax attention, for-loop AdamW, GradScaler off) and the fast step (fused SDPA, fused AdamW) give the
same losses on the same weights, images and masks, up to rounding."""

import argparse

import torch

from mae_scale.tools.bench import Variant, add_bench_step_arguments, build_train_step, variants_from_args

MODEL = "mae_vit_tiny_patch16"


def _losses(variant: Variant, steps: int = 3) -> list[float]:
    net, step, imgs, _ = build_train_step(MODEL, 4, variant, torch.device("cpu"), img_size=64, seed=0)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):  # step 1 compares the forward; steps 2-3 also the two AdamW implementations
        noise = torch.rand(imgs.shape[0], net.patch_embed.num_patches, generator=gen)
        losses.append(step(noise).item())
    return losses


def test_baseline_switch_changes_nothing_beyond_rounding_in_fp32():
    base = _losses(Variant(baseline=True, precision="fp32"))
    fast = _losses(Variant(baseline=False, precision="fp32"))
    torch.testing.assert_close(torch.tensor(base), torch.tensor(fast), rtol=1e-5, atol=1e-5)
    assert base[0] != base[-1]  # the optimizer really stepped


def test_baseline_switch_really_unfuses_attention():
    net = build_train_step(MODEL, 2, Variant(baseline=True), torch.device("cpu"), img_size=32).net
    assert all(not blk.attn.fused_attn for blk in [*net.blocks, *net.decoder_blocks])
    net = build_train_step(MODEL, 2, Variant(baseline=False), torch.device("cpu"), img_size=32).net
    assert all(blk.attn.fused_attn for blk in [*net.blocks, *net.decoder_blocks])


def test_compare_runs_baseline_first_and_adds_compile_when_asked():
    parser = add_bench_step_arguments(argparse.ArgumentParser())
    names = [v.name for v in variants_from_args(parser.parse_args(["--compare", "--compile"]))]
    assert names == ["baseline", "fast", "fast + compile"]
    assert [v.name for v in variants_from_args(parser.parse_args(["--baseline"]))] == ["baseline"]


def test_bench_step_table_from_the_command_line_arguments(capsys):
    parser = add_bench_step_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", MODEL, "--batch", "2", "--img-size", "32", "--steps", "1", "--warmup", "1",
                              "--repeats", "1", "--compare"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "| baseline |" in out and "| fast |" in out and "x first" in out
