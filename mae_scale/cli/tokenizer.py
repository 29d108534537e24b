"""`mae-scale tokenizer fit`: a patch k-means codebook for BEiT-style targets."""

from __future__ import annotations

import argparse
from pathlib import Path

from mae_scale.cli_args import check_output_file, non_negative_int, positive_int
from mae_scale.errors import UserError
from mae_scale.tokenizers.kmeans import fit_tokenizer


def _fit_command(args: argparse.Namespace) -> int:
    """Every check a fit can fail is made before the first image is read: a fit takes hours, and
    its output is written only at the end."""
    if args.vocab < 2:
        raise UserError(f"--vocab {args.vocab}: a codebook needs at least 2 codewords")
    if args.input_size % args.patch_size:
        raise UserError(f"--input-size {args.input_size} is not a multiple of --patch-size {args.patch_size}; "
                        f"try --input-size {max(args.patch_size, args.input_size // args.patch_size * args.patch_size)}")
    check_output_file(args.out, ".safetensors")
    from data_pipeline import DataInputError, LoaderWorkerDied, TooManyBadSamples, resolve_shards

    local = args.shards.partition("#")[0]
    if "{" not in local and "://" not in local and not local.startswith("pipe:") and not Path(local).exists():
        raise UserError(f"{args.shards} does not exist; point it at shards written by `mae-scale make-shards` "
                        "(a folder, its manifest.json or a brace pattern)")
    try:
        shards = resolve_shards(args.shards)
    except (OSError, ValueError) as exc:
        raise UserError(f"{args.shards}: {str(exc).splitlines()[0]}; point it at shards written by "
                        "`mae-scale make-shards`") from None
    counts = getattr(shards, "counts", None)  # None: not known without reading (remote shards)
    if counts is not None:
        images = min(sum(counts) * args.epochs, args.max_images or sum(counts) * args.epochs)
        patches = images * (args.input_size // args.patch_size) ** 2
        if args.vocab > patches:  # k-means would read everything, then have no codebook to save
            raise UserError(f"--vocab {args.vocab} is more than the {patches} patches of {images} images "
                            f"at {args.input_size} px; use a smaller --vocab or more images")
    try:
        summary = fit_tokenizer(args.shards, args.vocab, args.out, patch_size=args.patch_size,
                                input_size=args.input_size, batch_size=args.batch_size, max_images=args.max_images,
                                epochs=args.epochs, seed=args.seed, num_workers=args.workers, progress=True)
    except (ValueError, DataInputError, TooManyBadSamples, LoaderWorkerDied) as exc:
        # the data or the settings against it (a batch larger than the shards, too many damaged
        # samples): one line; the output was not written
        raise UserError(f"{args.shards}: {str(exc).splitlines()[0]}") from None
    print(f"wrote {summary['out']}: vocab {summary['vocab']}, {summary['images']} images in "
          f"{summary['seconds']:.0f} s, {summary['reseeded']} re-seeded, last-epoch usage "
          f"{summary['usage']:.1%}, perplexity {summary['perplexity']:.0f}", flush=True)
    return 0


def add_tokenizer_parser(subparsers) -> None:
    """``mae-scale tokenizer fit SHARDS --vocab V --out FILE``: fit a patch k-means tokenizer."""
    p = subparsers.add_parser("tokenizer", help="visual tokenizers for BEiT-style targets")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("fit", help="fit a patch k-means codebook (mini-batch k-means) on shards; saves safetensors")
    s.add_argument("shards", help="manifest, shard folder or brace pattern")
    s.add_argument("--vocab", type=positive_int, default=8192, help="codebook size (BEiT's DALL-E vocabulary is 8192)")
    s.add_argument("--out", required=True, help="output .safetensors file (missing folders are created)")
    s.add_argument("--max-images", type=positive_int, default=None, help="stop after this many images (all epochs)")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--epochs", type=positive_int, default=1)
    s.add_argument("--input-size", type=positive_int, default=224)
    s.add_argument("--patch-size", type=positive_int, default=16, help="the model's patch size (a token per patch)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=non_negative_int, default=0, help="loader worker processes")
    s.set_defaults(run=_fit_command)
