"""Training: one loop that tasks plug into, and the run that the CLI and the SLURM job call.

- `loop.py`: `Loop` (engine, resume, schedule, step with the finite guard, checkpoint cadence,
  metrics, signals); knows no objective and no task.
- `task.py`: what a task gives the loop; `pretrain.py` (`PretrainTask(objective)`),
  `classify.py` (`ClassifyTask`: fine-tuning, linear probing, evaluation, `--eval-only`).
- `rundir.py`: every file of a run directory.
- `entry.py`: `run(verb, config, overrides)`, config to exit status.
"""

from mae_scale.train.entry import build_loop, load_run_config, run

__all__ = ["build_loop", "load_run_config", "run"]
