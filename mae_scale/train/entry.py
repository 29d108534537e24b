"""One training run from a verb, a preset and overrides: what `mae-scale pretrain | finetune |
linprobe` and the SLURM job (`launchers.slurm`) both call.

The config is loaded and checked before any process group starts or any file is written; then the
loop is built around the verb's task, trained, and reported. Every way a run can stop that a user
can act on ends as one line and a status (`mae_scale.errors`): bad input 2, a run that cannot go on
1 (recorded in MLflow as FAILED with the reason), a signal 128 + its number.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mae_scale.distributed import DistEnv, init_distributed, shutdown_distributed
from mae_scale.errors import RunInterrupted, RunStopped, kind_of, one_line, report
from mae_scale.train.loop import Loop, NonFiniteLossError
from mae_scale.train.rundir import EVAL_ONLY, RunDir

CLASSIFY_VERBS = ("finetune", "linprobe")


def load_run_config(verb: str, config: Optional[str], overrides: Sequence[str], eval_only: bool = False):
    """The checked config of a verb (ConfigError, one line, before anything is created)."""
    if verb in CLASSIFY_VERBS:
        from mae_scale.finetune_config import load_finetune_config

        return load_finetune_config(config, list(overrides), mode=verb, eval_only=eval_only)
    from mae_scale.config import load_config

    return load_config(config, list(overrides))


def build_loop(cfg, env: DistEnv, accept_config_change: bool = False) -> Loop:
    """The loop around the config's task: fine-tuning / probing, or pretraining with its objective."""
    from mae_scale.finetune_config import FinetuneConfig

    if isinstance(cfg, FinetuneConfig):
        from mae_scale.train.classify import ClassifyTask

        task = ClassifyTask(cfg)
    else:
        from mae_scale.objectives import OBJECTIVES
        from mae_scale.train.pretrain import PretrainTask

        task = PretrainTask(OBJECTIVES[cfg.model.objective](cfg))
    return Loop(cfg, env, task, accept_config_change)


def run(verb: str, config: Optional[str], overrides: Sequence[str] = (), *, accept_config_change: bool = False,
        eval_only: bool = False) -> int:
    """Train (or with `eval_only`, evaluate) and report; returns the exit status. A failure nothing
    anticipated propagates with its traceback."""
    try:
        return _run(verb, config, overrides, accept_config_change, eval_only)
    except Exception as exc:
        code = report(exc)
        if code is None:
            raise
        return code


def _run(verb: str, config: Optional[str], overrides: Sequence[str], accept_config_change: bool,
         eval_only: bool) -> int:
    cfg = load_run_config(verb, config, overrides, eval_only)  # refused here, before any process group or data
    env = init_distributed()
    if eval_only:
        return _evaluate_only(cfg, env)
    loop = build_loop(cfg, env, accept_config_change)  # model.init is read when the model is built
    try:
        result = loop.train()
    except RunInterrupted:
        raise
    except Exception as exc:
        kind = kind_of(exc)
        if kind is None:
            raise
        message = _explain(exc, loop)
        loop.fail(message)
        if kind is RunStopped:
            raise RunStopped(message) from None
        raise  # bad input found mid-run (a data set none of whose shards reads): its own status
    if env.is_main:
        print("\ndone:")
        print(f"  run directory    {result['run_dir']}")
        print(f"  checkpoint       {result['checkpoint']}")
        for line in loop.task.summary(result):
            print(f"  {line}")
        if result.get("mlflow_run_id"):
            print(f"  MLflow           {result['mlflow_uri']} (run {result['mlflow_run_id']}); "
                  f"browse with: mlflow ui --backend-store-uri {result['mlflow_uri']}")
    shutdown_distributed()  # success only: a failure above may be one rank's, whose peers never reach it
    return 0


def _explain(exc: BaseException, loop: Loop) -> str:
    """The line a stopped run ends with: what happened, that the newest checkpoint is intact, and
    what to change before running the same command again."""
    from data_pipeline import TooManyBadSamples

    newest = f"the newest checkpoint ({loop.ckpt.latest() or 'none yet'}) is untouched"
    if isinstance(exc, TooManyBadSamples):
        return f"{one_line(exc)} (raise data.max_bad_fraction to accept more); {newest}"
    if isinstance(exc, NonFiniteLossError):
        return (f"{exc}; {newest}: lower the learning rate (optim.blr or optim.lr) or check the data, then run "
                "the same command to resume")
    return one_line(exc)


def _evaluate_only(cfg, env: DistEnv) -> int:
    from mae_scale.train.classify import evaluate_only

    result = evaluate_only(cfg, env)
    shutdown_distributed()  # every rank is done; what is left is rank 0's file
    if env.is_main:
        RunDir(cfg.output_dir).write_json(EVAL_ONLY, result)
    return 0
