"""Checkpoints behind one interface: what the saver writes is what a resume, a requeue, `export`
and `finetune` read.

- `manager.py`: save (COMPLETE marker last), find the newest complete one, resume with fallback
  past damaged ones, keep the last K; the one place that knows the layout under RUN_DIR/checkpoints.
- `integrity.py`: sizes and CRC-32 of every file in the marker, checked before a byte is loaded.
- `safe_load.py`: weights-only loading; no checkpoint file can execute code.
- `consolidation.py`: any checkpoint -> its fp32 state dict (ZeRO 0-3, any world size).
- `reshard.py`: DeepSpeed universal checkpoints for a resume at another world size.
"""

from mae_scale.checkpoint.consolidation import consolidate
from mae_scale.checkpoint.manager import (DAMAGED_PREFIX, MARKER, CheckpointError, CheckpointManager,
                                          CheckpointSaveError, complete_checkpoints, latest_checkpoint, read_marker)
from mae_scale.checkpoint.safe_load import install_safe_loader, safe_torch_load

__all__ = ["consolidate", "DAMAGED_PREFIX", "MARKER", "CheckpointError", "CheckpointManager", "CheckpointSaveError",
           "complete_checkpoints", "latest_checkpoint", "read_marker", "install_safe_loader", "safe_torch_load"]
