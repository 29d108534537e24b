"""Every file of a run directory, in one place (the checkpoints under it: `mae_scale.checkpoint`;
its lock: `mae_scale.runlock`).

    RUN_DIR/config.yaml          the config the run was started with (checked on every resume)
    RUN_DIR/metrics.jsonl        a row per logged step (loss, lr, speed, MFU, memory, bad samples), and
                                 a row per monitor measurement (held-out loss, k-NN accuracy)
    RUN_DIR/eval.jsonl           a row per evaluation (fine-tuning, linear probing)
    RUN_DIR/attempts.jsonl       a row per start: when, where, world size, from which step
    RUN_DIR/reconstructions/     step_XXXXXXXX.png pictures (pretraining)
    RUN_DIR/loss_curve.png       the loss curve, drawn at the end
    RUN_DIR/monitor.png          held-out loss and k-NN curves (with `monitor.*` on), drawn at the end
    RUN_DIR/result.json          what the run ended with
    RUN_DIR/eval_only.json       what `--eval-only` measured
    RUN_DIR/checkpoints/         step_XXXXXXXX/ with a COMPLETE marker

The per-step logs are JSON lines keyed by "step"; on a resume the rows after the checkpoint are
cut, because those steps are about to be run again. A torn last line (a kill in the middle of a
write) is dropped when read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

METRICS = "metrics.jsonl"
EVALS = "eval.jsonl"
ATTEMPTS = "attempts.jsonl"
CONFIG = "config.yaml"
RESULT = "result.json"
EVAL_ONLY = "eval_only.json"
PICTURES = "reconstructions"
LOSS_CURVE = "loss_curve.png"
MONITOR_CURVE = "monitor.png"


def _json_or_none(line: str) -> Optional[dict]:
    """A row of a JSON-lines log, or None for a blank or torn one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # -- config ----------------------------------------------------------------------------------
    def saved_config(self) -> Optional[dict]:
        """The config the run was started with, or None for a new run."""
        import yaml

        path = self.file(CONFIG)
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None

    def save_config(self, cfg: Any) -> Path:
        from mae_scale.config import save_config

        save_config(cfg, self.file(CONFIG))
        return self.file(CONFIG)

    # -- JSON-lines logs -------------------------------------------------------------------------
    def append(self, name: str, row: dict) -> None:
        with open(self.file(name), "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self, name: str) -> list[dict]:
        path = self.file(name)
        if not path.is_file():
            return []
        return [r for r in (_json_or_none(line) for line in path.read_text().splitlines()) if r is not None]

    def cut_back(self, names: tuple[str, ...], step: int) -> None:
        """Drop rows after `step` from the per-step logs: those steps are about to be run again."""
        for name in names:
            if self.file(name).is_file():
                rows = [r for r in self.rows(name) if r.get("step", math.inf) <= step]
                self.file(name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # -- pictures and results --------------------------------------------------------------------
    def picture_path(self, step: int) -> Path:
        out = self.file(PICTURES) / f"step_{step:08d}.png"
        out.parent.mkdir(exist_ok=True)
        return out

    def newest_picture(self) -> Optional[Path]:
        folder = self.file(PICTURES)
        return max(folder.glob("step_*.png"), default=None) if folder.is_dir() else None

    def write_json(self, name: str, data: dict) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        self.file(name).write_text(json.dumps(data, indent=2, default=str))
        return self.file(name)
