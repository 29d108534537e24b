"""`mae-scale <verb>`: parse, build, run, close. The verbs' work lives in their own modules.

Bad input ends with one line on stderr (`error: ...`) and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train_and_report(build, summary) -> int:
    """Build the trainer, run the loop, print where everything is, end the process group. Every
    way a run can stop that a user can act on ends as one line: bad input (a weights file that does
    not fit, a run directory another process holds, a config change a resume cannot take) with
    status 2; a run that cannot go on (no loadable checkpoint, a save that failed, diverged numbers,
    too many bad samples, a dead loader worker) with 1; a signal with 128 + its number.
    `summary(result)` gives the verb's own lines of the report."""
    from mae_scale.checkpoint import CheckpointError, CheckpointSaveError
    from mae_scale.distributed import shutdown_distributed
    from mae_scale.runlock import RunDirBusy
    from mae_scale.stop_signals import RunInterrupted
    from mae_scale.trainer import NonFiniteLossError
    from mae_scale.weights import WeightsError

    from data_pipeline import LoaderWorkerDied, TooManyBadSamples

    try:
        trainer = build()
    except (WeightsError, RunDirBusy) as exc:
        raise UserError(str(exc)) from None
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        result = trainer.train()
    except RunInterrupted as exc:
        if trainer.env.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except (CheckpointSaveError, LoaderWorkerDied) as exc:
        trainer.fail(str(exc).splitlines()[0])
        return 1
    except TooManyBadSamples as exc:
        trainer.fail(f"{str(exc).splitlines()[0]} (raise data.max_bad_fraction to accept more); "
                     f"the newest checkpoint ({trainer.ckpt.latest() or 'none yet'}) is untouched")
        return 1
    except NonFiniteLossError as exc:
        trainer.fail(f"{exc}; the newest checkpoint ({trainer.ckpt.latest() or 'none yet'}) is untouched: lower "
                     "the learning rate (optim.blr or optim.lr) or check the data, then run the same command to resume")
        return 1
    if trainer.env.is_main:
        print("\ndone:")
        print(f"  run directory    {result['run_dir']}")
        print(f"  checkpoint       {result['checkpoint']}")
        for line in summary(result):
            print(f"  {line}")
        if result.get("mlflow_run_id"):
            print(f"  MLflow           {result['mlflow_uri']} (run {result['mlflow_run_id']}); "
                  f"browse with: mlflow ui --backend-store-uri {result['mlflow_uri']}")
    shutdown_distributed()  # success only: a failure above may be one rank's, whose peers never reach it
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from mae_scale.config import load_config

    cfg = load_config(args.config, args.overrides)  # refused here, before any process group or data
    from mae_scale.distributed import init_distributed
    from mae_scale.trainer import Pretrainer

    def summary(result: dict) -> list[str]:
        lines = [f"reconstructions  {result['picture']}"]
        if result.get("loss_curve"):
            lines.append(f"loss curve       {result['loss_curve']}")
        return lines

    env = init_distributed()
    return _train_and_report(lambda: Pretrainer(cfg, env, args.accept_config_change), summary)  # model.init is read when built


def _finetune(args: argparse.Namespace) -> int:
    """`finetune` and `linprobe` (the verb is the mode); `--eval-only` evaluates `model.init`."""
    from mae_scale.finetune_config import load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides, mode=args.verb, eval_only=args.eval_only)
    from mae_scale.distributed import init_distributed, shutdown_distributed
    from mae_scale.finetune import Finetuner, evaluate_only
    from mae_scale.weights import WeightsError

    env = init_distributed()
    if args.eval_only:
        try:
            result = evaluate_only(cfg, env)
        except WeightsError as exc:
            raise UserError(str(exc)) from None
        shutdown_distributed()  # every rank is done; what is left is rank 0's file
        if env.is_main:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_only.json").write_text(json.dumps(result, indent=2, default=str))
        return 0

    def summary(result: dict) -> list[str]:
        lines = []
        if "best_acc1" in result:
            lines.append(f"top-1            best {result['best_acc1']:.2f}% (step {result['best_step']}), "
                         f"last {result['last_acc1']:.2f}% (top-5 {result['last_acc5']:.2f}%)")
        return lines + [f"evaluations      {result['eval_log']}"]

    return _train_and_report(lambda: Finetuner(cfg, env, args.accept_config_change), summary)


def _make_shards(args: argparse.Namespace) -> int:
    from data_pipeline import DataInputError, write_shards

    src = Path(args.src)
    if not src.exists():
        raise UserError(f"source {src} does not exist; pass an image folder, an ImageNet-style train folder or a file list")
    try:
        manifest = write_shards(src, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                                max_bytes_per_shard=args.max_bytes_per_shard, seed=args.seed, num_workers=args.workers)
    except DataInputError as exc:  # bad input: one line, status 2
        raise UserError(str(exc)) from None
    except OSError as exc:  # the disk (full, read-only, failing): one line, status 1
        print(f"error: writing shards failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"wrote {len(manifest['shards'])} shards, {manifest['total']} samples, "
          f"{manifest.get('num_classes') or 0} classes to {args.out}")
    return 0


def _verify_shards(args: argparse.Namespace) -> int:
    from data_pipeline import DataInputError, verify_shards

    if not (Path(args.shards) / "manifest.json").is_file():
        raise UserError(f"{args.shards} has no manifest.json; point at a folder written by `mae-scale make-shards`")
    try:
        problems = verify_shards(args.shards)
    except DataInputError as exc:
        raise UserError(str(exc)) from None
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) found in {args.shards}" if problems else f"{args.shards}: all shards match the manifest")
    return 1 if problems else 0


def _data_index(args: argparse.Namespace) -> int:
    from data_pipeline import DataInputError
    from data_pipeline.index import expand_spec, index_shards, is_remote

    try:
        urls = expand_spec(args.shards)
    except DataInputError as exc:
        raise UserError(str(exc)) from None
    local = [Path(u) for u in urls if not is_remote(u)]
    if args.out is None and (len(local) != len(urls) or len({p.parent for p in local}) != 1):
        raise UserError(f"{args.shards}: remote shards or tars in several folders; say where the manifest goes with --out")
    out = Path(args.out) if args.out else local[0].parent / "manifest.json"
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out}: give a file path in an existing folder")
    if out.exists() and '"source": "index"' not in out.read_text(errors="replace"):
        raise UserError(f"{out} exists and was not written by `data index`; pass another --out")
    missing = [p for p in local if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} is not a file ({len(missing)} of {len(urls)} shards missing)")
    remote = len(urls) - len(local)
    if remote:  # a pipe cannot seek: say so before the long read
        print(f"{remote} remote shard(s): a pipe cannot seek, so each is read once in full", file=sys.stderr)
    m = index_shards(urls, out, workers=args.workers, checksums=args.checksums)
    read = m["read"]
    streamed = f"; {read['streamed']} read in full (remote, compressed or damaged)" if read["streamed"] else ""
    print(f"indexed {len(urls)} shards, {m['total']} samples -> {out} ({read['bytes'] / 2**20:.1f} MiB of headers read"
          f"{streamed})")
    for url, problem in read["problems"].items():
        print(f"warning: {url}: {problem}", file=sys.stderr)
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline import DataInputError, LoaderWorkerDied, TooManyBadSamples
    from data_pipeline.bench import bench_data

    if args.decode_device == "cuda" and not torch.cuda.is_available():
        raise UserError("--decode-device cuda needs a CUDA GPU and torch sees none; use cpu or cpu-batched")
    try:
        result = bench_data(args.shards, workers=args.workers, batch_size=args.batch, input_size=args.img_size,
                            repeats=args.repeats, decode_device=args.decode_device, mix=args.as_mix)
    except (DataInputError, FileNotFoundError, TooManyBadSamples, LoaderWorkerDied) as exc:
        raise UserError(str(exc).splitlines()[0]) from None  # the data or its path: one line
    print(json.dumps({k: v for k, v in result.items() if k != "table"}) if args.json else result["table"])
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from mae_scale.config import PretrainConfig, reference_markdown
    from mae_scale.finetune_config import FinetuneConfig

    print("| key | type | default | meaning |\n|---|---|---|---|")
    print("\n".join(reference_markdown(FinetuneConfig if args.kind == "finetune" else PretrainConfig)))
    return 0


ACCEPT_HELP = ("resume even though the config changes keys that alter the run (learning rate, schedule, data: "
               "listed when refused); changes a checkpoint cannot take are refused all the same")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from mae_scale.cli_args import OneLineParser  # every verb's argparse errors: one line, status 2

    parser = OneLineParser(prog="mae-scale", description="MAE pretraining at scale on DeepSpeed ZeRO.")
    # The `deepspeed` launcher puts --local_rank before the verb; LOCAL_RANK in the env is what counts.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("pretrain", help="MAE pretraining (resumes by itself from the output directory)")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/pretrain/mae_vit_tiny_smoke.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--accept-config-change", action="store_true", help=ACCEPT_HELP)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(run=_pretrain)

    for verb, what, example in (
            ("finetune", "fine-tuning with layer-wise LR decay (resumes by itself)", "configs/finetune/vit_base_patch16_100ep.yaml"),
            ("linprobe", "linear probing of a frozen encoder (resumes by itself)", "configs/linprobe/vit_base_patch16_90ep.yaml")):
        p = verbs.add_parser(verb, help=what)
        p.add_argument("--config", required=True, help=f"YAML preset, e.g. {example}")
        p.add_argument("--eval-only", action="store_true", help="evaluate model.init on data.val_shards; train nothing")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.init=runs/mae")
        p.add_argument("--accept-config-change", action="store_true", help=ACCEPT_HELP)
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        p.set_defaults(run=_finetune)

    p = verbs.add_parser("make-shards", help="write an image folder or file list into WebDataset tar shards")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--prefix", default="train")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-bytes-per-shard", type=int, default=None, help="also close a shard before it passes this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(run=_make_shards)

    p = verbs.add_parser("bench", help="benchmarks that print measured figures")
    sub = p.add_subparsers(dest="what", required=True)
    from mae_scale.bench import add_bench_step_arguments

    add_bench_step_arguments(sub.add_parser(
        "step", help="images/s, step time, MFU, peak memory of the training step; --baseline/--compile/--compare"))
    s = sub.add_parser("data", help="images/s (and per core) of the loader vs the official PIL+torchvision pipeline")
    s.add_argument("shards", help="manifest, shard folder or brace pattern")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--img-size", type=int, default=224)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--decode-device", choices=["cpu", "cuda", "cpu-batched"], default="cpu",
                   help="where the project's loader decodes: workers (cpu), batched nvJPEG (cuda), batched on the CPU")
    s.add_argument("--json", action="store_true")
    s.add_argument("--as-mix", action="store_true",
                   help="also time the project's loader over the same shards as a two-source mix (data.train_shards list)")
    s.set_defaults(run=_bench_data)

    p = verbs.add_parser("data", help="data utilities")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("verify", help="re-read shards against their manifest (counts, checksums)")
    s.add_argument("shards")
    s.set_defaults(run=_verify_shards)
    s = sub.add_parser("index", help="count foreign shards (tar headers only where the storage can seek) into our manifest")
    s.add_argument("shards", help="a folder of tars, a brace pattern, or pipe:/URL shards")
    s.add_argument("--out", default=None, help="manifest path (default: manifest.json beside local tars)")
    from mae_scale.cli_args import positive_int

    s.add_argument("--workers", type=positive_int, default=None, help="tars counted at once (default: 2 x cores, at most 16)")
    s.add_argument("--checksums", action="store_true", help="also record each local tar's sha256 (reads it all)")
    s.set_defaults(run=_data_index)
    from data_pipeline.fashion_mnist import add_fashion_mnist_parser

    add_fashion_mnist_parser(sub)

    p = verbs.add_parser("config", help="print the config reference (every key, type, default, meaning)")
    p.add_argument("--kind", choices=["pretrain", "finetune"], default="pretrain",
                   help="pretrain: `mae-scale pretrain`; finetune: `mae-scale finetune` / `linprobe`")
    p.set_defaults(run=_config_reference)

    from launchers.slurm import add_status_parser, add_submit_parser
    from mae_scale.export import add_export_parser
    from mae_scale.plan import add_plan_parser
    from mae_scale.tokenizer import add_tokenizer_parser

    add_export_parser(verbs)
    add_plan_parser(verbs)
    add_tokenizer_parser(verbs)

    add_submit_parser(verbs)
    add_status_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mae_scale.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def report_crash(exc: BaseException) -> int:
    """A failure nothing anticipated: one line naming it and the file that holds its traceback
    (`MAE_SCALE_TRACEBACK=1` prints the traceback instead, as the tests do); status 1."""
    import os
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(exc))
    path = Path(tempfile.gettempdir()) / f"mae-scale-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    if not os.environ.get("MAE_SCALE_TRACEBACK"):
        try:
            path.write_text(text)
        except OSError:
            path = None
    if os.environ.get("MAE_SCALE_TRACEBACK") or path is None:
        print(text, file=sys.stderr, end="", flush=True)
        return 1
    what = (str(exc).strip().splitlines() or [""])[0][:300]
    print(f"error: unexpected {type(exc).__name__}: {what} (the traceback is in {path}; please report it with the "
          "command that ran)", file=sys.stderr, flush=True)
    return 1


def entry() -> None:
    """The `mae-scale` console script and `python -m mae_scale`: `main`, then the exit.

    A run that started a process group leaves through `exit_process` (no interpreter
    finalization, where gloo's threads can abort a finished run); a crash ends in one line
    (`report_crash`, status 1) on every path; `main` itself returns normally for callers in-process
    (the SLURM job)."""
    def in_process_group() -> bool:
        distributed = sys.modules.get("mae_scale.distributed")  # imported only by verbs that may start one
        return distributed is not None and distributed.process_group_started()

    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops itself at a step boundary)
        print("error: interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as exc:
        code = report_crash(exc)
    if in_process_group():
        sys.modules["mae_scale.distributed"].exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
