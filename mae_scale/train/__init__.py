"""Training: one loop that tasks plug into, and the run that the CLI and the SLURM job call.

- `loop.py`: `Loop` (engine, resume, schedule, step with the finite guard, checkpoint cadence,
  metrics, signals); knows no objective and no task.
- `task.py`: what a task gives the loop; `pretrain.py` (`PretrainTask(objective)`),
  `classify.py` (`ClassifyTask`: fine-tuning, linear probing, evaluation, `--eval-only`).
- `rundir.py`: every file of a run directory.
- `entry.py`: `run(verb, config, overrides)`, config to exit status.

`run`, `build_loop` and `load_run_config` are loaded on first use: `submit` and `status` on a login
node read `rundir`'s names without importing the training stack.
"""

__all__ = ["build_loop", "load_run_config", "run"]


def __getattr__(name: str):
    if name in __all__:
        from mae_scale.train import entry

        return getattr(entry, name)
    raise AttributeError(f"module 'mae_scale.train' has no attribute {name!r}")
