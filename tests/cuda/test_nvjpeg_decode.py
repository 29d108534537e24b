"""make_loader(decode_device="cuda"): batched nvJPEG decode on the GPU gives the CPU path's crops
(same keys, labels, crop boxes), with pixels within the tolerance this check has always had (moved
here from tests/data/test_data_batched_decode.py): nvJPEG's IDCT and the CUDA resize kernels differ
slightly from libjpeg-turbo + the CPU kernels, so the mean absolute difference of each batch must be
below 3 (of 255), where the CPU twin `cpu-batched` is held to 1 per image. The worst batch and the
worst single image are recorded. Also the `bench data --decode-device cuda` switch the GPU
acceptance measures it with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cuda_support import needs_gpu, record
from data_pipeline import make_loader
from run_helpers import ROOT, run_env

pytestmark = [pytest.mark.cuda, needs_gpu]

SIZE = 64
B = 8
TOL = 3.0  # mean |diff| over a batch, in 0-255 units


@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_decode_matches_cpu_path(small_shards, workers):
    cpu = list(make_loader(small_shards, B, input_size=SIZE, num_workers=workers))
    gpu = list(make_loader(small_shards, B, input_size=SIZE, num_workers=workers, decode_device="cuda"))
    assert len(cpu) == len(gpu) > 0
    worst_batch = worst_image = 0.0
    for x, y in zip(cpu, gpu):
        assert y["image"].is_cuda and y["image"].dtype == torch.uint8 and y["image"].shape == x["image"].shape
        assert x["key"] == y["key"] and torch.equal(x["label"], y["label"].cpu())
        per_image = (x["image"].float() - y["image"].cpu().float()).abs().mean(dim=(1, 2, 3))
        worst_batch = max(worst_batch, per_image.mean().item())
        worst_image = max(worst_image, per_image.max().item())
    record(test="nvjpeg_decode", workers=workers, images=sum(len(b["key"]) for b in cpu),
           worst_batch_mean_abs_diff=worst_batch, worst_image_mean_abs_diff=worst_image, tol=TOL)
    assert worst_batch < TOL, f"a batch differs by {worst_batch:.2f} on average (tolerance {TOL})"


def test_bench_data_decode_device_cuda(small_shards):
    proc = subprocess.run([sys.executable, "-m", "mae_scale", "bench", "data", str(small_shards), "--workers", "2",
                           "--batch", "16", "--img-size", str(SIZE), "--repeats", "1", "--decode-device", "cuda",
                           "--json"], capture_output=True, text=True, timeout=300, env=run_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["decode_device"] == "cuda" and result["samples"] == 128 and result["ratio"] > 0
