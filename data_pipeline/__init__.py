"""mae-scale data pipeline: image folders -> WebDataset shards -> augmented uint8 batches.

Knows nothing about models or DeepSpeed. The pieces:

- ``shards``: write an ImageNet-style folder / file list to tar shards + manifest; verify them.
- ``stream``: per-rank, per-worker deterministic epoch streams with exact resume (``make_loader``);
  optionally resampled (with replacement, fixed epoch length) and/or decoded batched on a GPU.
- ``augment``: fast JPEG decode + MAE RandomResizedCrop/flip, uint8 out (normalise on device);
  ``decode_batch``: the batched (nvJPEG) decode behind ``make_loader(decode_device=...)``.
- ``samples``: tiny real-photo data sets made offline, for demos and tests.
- ``index`` / ``tarscan``: sample counts of shards written by others (timm ``_info.json``, wids,
  img2dataset stats, else tar headers only); ``mix``: a weighted mix of sources as one epoch;
  ``keys``: which members hold the image and the label (``image_key`` / ``label_key``).
- ``shard_read``: reading one shard so that its damage costs its samples, never the run;
  ``loader_guard``: a killed loader worker as one ``LoaderWorkerDied`` line; ``errors``: the
  one-line errors (``TooManyBadSamples``, ``LoaderWorkerDied``, ``DataInputError``).
"""

from .augment import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    MAEAugment,
    RawJPEG,
    crop_params,
    decode_batch,
    decode_rgb,
)
from .errors import DataInputError, LoaderWorkerDied, TooManyBadSamples
from .samples import builtin_shards, make_sample_folder
from .shards import MANIFEST_FORMAT, read_manifest, write_shards
from .verify import verify_shards
from .stream import ShardLoader, ShardSet, make_loader, resolve_shards

__all__ = [
    "BadImage",
    "DataInputError",
    "LoaderWorkerDied",
    "DEFAULT_MAX_PIXELS",
    "MANIFEST_FORMAT",
    "MAEAugment",
    "ShardLoader",
    "ShardSet",
    "TooManyBadSamples",
    "builtin_shards",
    "RawJPEG",
    "crop_params",
    "decode_batch",
    "decode_rgb",
    "make_loader",
    "make_sample_folder",
    "read_manifest",
    "resolve_shards",
    "verify_shards",
    "write_shards",
]

# fine-tuning / evaluation data: timm's train augmentation, the eval stream, Fashion-MNIST shards
from .eval_stream import EvalLoader, make_eval_loader  # noqa: E402
from .fashion_mnist import read_idx, write_fashion_mnist_shards  # noqa: E402
from .finetune_augment import EvalTransform, FinetuneAugment  # noqa: E402

__all__ += [
    "EvalLoader",
    "EvalTransform",
    "FinetuneAugment",
    "make_eval_loader",
    "read_idx",
    "write_fashion_mnist_shards",
]
