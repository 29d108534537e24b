"""`mae-scale make-shards`, `data verify | index | fashion-mnist`, `bench data`: shards in and out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.fashion_mnist import DEFAULT_SRC, write_fashion_mnist_shards
from mae_scale.cli_args import positive_int
from mae_scale.errors import UserError


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


def _fashion_mnist(args: argparse.Namespace) -> int:
    """Bad input (no IDX files, files that are not IDX, OUT a file) is one line and status 2, as
    for every verb; the disk failing while writing is one line and status 1."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; OUT must be a directory (it gets train/, val/, classes.json)")
    try:
        paths = write_fashion_mnist_shards(
            args.out, args.src, samples_per_shard=args.samples_per_shard,
            train_limit=args.train_limit, val_limit=args.val_limit, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    except OSError as e:
        print(f"error: writing Fashion-MNIST shards to {out} failed: {e}", file=sys.stderr, flush=True)
        return 1
    for split, p in paths.items():
        print(f"{split}: {p}")
    return 0


def add_fashion_mnist_parser(
    data_subparsers: argparse._SubParsersAction,
) -> argparse.ArgumentParser:
    """Add ``fashion-mnist OUT [--src DIR] [--train-limit N] [--val-limit N]
    [--samples-per-shard N]`` to the ``data`` verb's subparsers (``mae-scale data
    fashion-mnist OUT``); ``args.run(args)`` returns the exit code."""
    p = data_subparsers.add_parser(
        "fashion-mnist", help="convert Fashion-MNIST (IDX files) to train/val WebDataset shards")
    p.add_argument("out", metavar="OUT", help="output directory (gets train/, val/, classes.json)")
    p.add_argument("--src", default=DEFAULT_SRC,
                   help=f"directory with the IDX files (default: {DEFAULT_SRC}, from the Debian "
                        "package dataset-fashion-mnist)")
    p.add_argument("--train-limit", type=positive_int, default=None, help="keep the first N train images")
    p.add_argument("--val-limit", type=positive_int, default=None, help="keep the first N val images")
    p.add_argument("--samples-per-shard", type=positive_int, default=10000)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=_fashion_mnist)
    return p


def add_make_shards_parser(verbs) -> None:
    p = verbs.add_parser("make-shards", help="write an image folder or file list into WebDataset tar shards")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--prefix", default="train")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-bytes-per-shard", type=int, default=None, help="also close a shard before it passes this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(run=_make_shards)


def add_data_parsers(verbs) -> None:
    p = verbs.add_parser("data", help="data utilities")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("verify", help="re-read shards against their manifest (counts, checksums)")
    s.add_argument("shards")
    s.set_defaults(run=_verify_shards)
    s = sub.add_parser("index", help="count foreign shards (tar headers only where the storage can seek) into our manifest")
    s.add_argument("shards", help="a folder of tars, a brace pattern, or pipe:/URL shards")
    s.add_argument("--out", default=None, help="manifest path (default: manifest.json beside local tars)")
    s.add_argument("--workers", type=positive_int, default=None, help="tars counted at once (default: 2 x cores, at most 16)")
    s.add_argument("--checksums", action="store_true", help="also record each local tar's sha256 (reads it all)")
    s.set_defaults(run=_data_index)
    add_fashion_mnist_parser(sub)



def add_bench_data_parser(sub) -> None:
    """`bench data` (the `bench` group is made in `mae_scale.cli.tools`)."""
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

