"""`mae-scale pretrain | finetune | linprobe`: parse, then `mae_scale.train.run`, which the SLURM
job calls too."""

from __future__ import annotations

import argparse

ACCEPT_HELP = ("resume even though the config changes keys that alter the run (learning rate, schedule, data: "
               "listed when refused); changes a checkpoint cannot take are refused all the same")


def _train(args: argparse.Namespace) -> int:
    """`pretrain`, `finetune` and `linprobe` (the verb is the mode); `--eval-only` evaluates `model.init`."""
    from mae_scale.train import run

    return run(args.verb, args.config, args.overrides, accept_config_change=args.accept_config_change,
               eval_only=getattr(args, "eval_only", False))


def add_train_parsers(verbs) -> None:
    p = verbs.add_parser("pretrain", help="MAE pretraining (resumes by itself from the output directory)")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/pretrain/mae_vit_tiny_smoke.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--accept-config-change", action="store_true", help=ACCEPT_HELP)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(run=_train)

    for verb, what, example in (
            ("finetune", "fine-tuning with layer-wise LR decay (resumes by itself)", "configs/finetune/vit_base_patch16_100ep.yaml"),
            ("linprobe", "linear probing of a frozen encoder (resumes by itself)", "configs/linprobe/vit_base_patch16_90ep.yaml")):
        p = verbs.add_parser(verb, help=what)
        p.add_argument("--config", required=True, help=f"YAML preset, e.g. {example}")
        p.add_argument("--eval-only", action="store_true", help="evaluate model.init on data.val_shards; train nothing")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.init=runs/mae")
        p.add_argument("--accept-config-change", action="store_true", help=ACCEPT_HELP)
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        p.set_defaults(run=_train)
