"""`mae-scale export`, `config`, `bench step | data`, `plan`: what is run beside training."""

from __future__ import annotations

import argparse

from mae_scale.cli.data import add_bench_data_parser
from mae_scale.export import export_weights


def _export(args: argparse.Namespace) -> int:
    summary = export_weights(args.src, args.out, with_decoder=args.with_decoder)
    print(f"exported {summary['model']} step {summary['step']} ({summary['format']}, {summary['keys']} tensors, "
          f"{summary['params'] / 1e6:.2f}M params, fp32) from {summary['checkpoint']} to {summary['out']}")
    return 0


def add_export_parser(subparsers):
    p = subparsers.add_parser("export", help="consolidate a checkpoint to one fp32 safetensors file "
                                             "(encoder only, timm ViT names, unless --with-decoder)")
    p.add_argument("src", help="run directory (its newest complete checkpoint) or a checkpoints/step_* folder")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--with-decoder", action="store_true",
                   help="keep MAE's decoder and mask token (to continue pretraining) instead of the encoder only")
    p.set_defaults(run=_export)
    return p


def _config_reference(args: argparse.Namespace) -> int:
    from mae_scale.config import PretrainConfig, reference_markdown
    from mae_scale.finetune_config import FinetuneConfig

    print("| key | type | default | meaning |\n|---|---|---|---|")
    print("\n".join(reference_markdown(FinetuneConfig if args.kind == "finetune" else PretrainConfig)))
    return 0


def add_bench_parser(verbs) -> None:
    from mae_scale.tools.bench import add_bench_step_arguments

    p = verbs.add_parser("bench", help="benchmarks that print measured figures")
    sub = p.add_subparsers(dest="what", required=True)
    add_bench_step_arguments(sub.add_parser(
        "step", help="images/s, step time, MFU, peak memory of the training step; --baseline/--compile/--compare"))
    add_bench_data_parser(sub)


def add_config_parser(verbs) -> None:
    p = verbs.add_parser("config", help="print the config reference (every key, type, default, meaning)")
    p.add_argument("--kind", choices=["pretrain", "finetune"], default="pretrain",
                   help="pretrain: `mae-scale pretrain`; finetune: `mae-scale finetune` / `linprobe`")
    p.set_defaults(run=_config_reference)
