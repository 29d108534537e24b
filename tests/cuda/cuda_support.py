"""What the tests under tests/cuda share: when they run, and where they record measured figures.

They check what only a CUDA GPU can (marker `cuda`, `python -m pytest -m cuda tests/cuda`) and skip
cleanly without one, so CI (no GPU) passes. `MAE_SCALE_CUDA_TESTS_ON_CPU=1` runs the DeepSpeed ones
on the CPU anyway (DeepSpeed's CPU accelerator, gloo): the GPU lease is rare and short, so the CPU
rehearsal (tools/gpu/rehearse.sh) proves the test code itself first. nvJPEG needs the GPU regardless.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
REHEARSAL = os.environ.get("MAE_SCALE_CUDA_TESTS_ON_CPU") == "1"

# The shared pretraining runs (conftest.gpu_runs), here because test modules cannot import a conftest.
STAGES = (1, 2, 3)
STEPS = 7
# SIGKILL after the step-4 checkpoint's files are written and before its COMPLETE marker: the
# resumed run must go back to step 2 and replay steps 3-7 (the worst moment, as in test_resume.py).
FAULT = "save:4"

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
needs_gpu_or_rehearsal = pytest.mark.skipif(
    not (ON_GPU or REHEARSAL), reason="needs a CUDA GPU (MAE_SCALE_CUDA_TESTS_ON_CPU=1 runs it on the CPU)")


def record(**row) -> None:
    """Print a measured figure, and append it to $MAE_SCALE_TEST_RECORD (JSON lines) when set: the GPU
    acceptance puts these into its report, since a pass/fail alone hides how close a tolerance was."""
    row = {"device": torch.cuda.get_device_name() if ON_GPU else "cpu", **row}
    print("RECORD", json.dumps(row))
    path = os.environ.get("MAE_SCALE_TEST_RECORD")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
