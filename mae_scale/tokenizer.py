"""Discrete visual tokens for BEiT-style pretraining: a patch k-means codebook, fitted here.

BEiT (https://arxiv.org/abs/2106.08254) predicts, for each masked patch, the id that a tokenizer
gives the same crop. BEiT uses the DALL-E dVAE encoder (BEiT-v2 a VQ-KD encoder); no such weights
can be downloaded here, so this module fits its own tokenizer (and loads a DALL-E encoder state
dict you bring, see below and :mod:`mae_scale.tokenizer_dalle`):

**PatchKMeansTokenizer** - NOT the DALL-E tokenizer, and no claim of equal quality: a codebook of
``vocab`` vectors learned by mini-batch k-means (Sculley 2010, "Web-scale k-means clustering") over
16x16 patches. A patch is the ImageNet-normalized pixels (as the trainer has them), flattened in
MAE's (p, q, c) order, then normalized per patch to zero mean and unit variance exactly like MAE's
norm-pix target (unbiased variance, eps 1e-6), so tokens describe local structure, not brightness or
colour. Flat patches: a patch of one uniform colour still varies across its 3 channels (ImageNet
normalization differs per channel), so it normalizes to that colour's channel pattern and tokens
tell e.g. sky from grass; a patch whose 768 values are all (nearly) equal, variance below 1e-6 (a
single pixel one uint8 step off gives ~4e-7), becomes exactly the zero vector instead of amplified
rounding noise, and gets the codeword nearest the origin, the same one for every such patch. A patch's
token is its nearest codeword in L2. How good the codebook is gets *measured*
(:func:`codebook_stats`: codeword usage, perplexity, patch reconstruction MSE against the best
single codeword), not assumed.

Fitting (:func:`fit_tokenizer`, ``mae-scale tokenizer fit``): the codebook starts as random patches
of the first batches; each batch is assigned to its nearest codewords and every codeword moves to the
running mean of all patches it has been given (Sculley's per-centre learning rate 1 / count, in one
vectorised step per batch). A codeword that took no patch while ``8 * vocab`` patches went by (an
average one would have taken 8) is dead and is re-seeded from a random patch of the current batch.

Files: safetensors only (``codebook`` + metadata: format, version, patch_size, vocab,
normalisation).

:func:`load_tokenizer` also loads the **DALL-E dVAE encoder** (BEiT v1's tokenizer,
:mod:`mae_scale.tokenizer_dalle`) from a local *state dict*: a safetensors file, or a ``.pth``
that ``torch.load(weights_only=True)`` reads (a dict of tensors, never arbitrary objects), whose
keys are the official encoder's (``blocks.input.w``, ...). It refuses everything else with one
line: URLs (local files only), missing files, pickled modules such as DALL-E's ``encoder.pkl``
(unpickling runs code; convert it to a state dict first, see :mod:`mae_scale.tokenizer_dalle`),
other pickles, and other safetensors files.

It also loads the **BEiT v2 VQ-KD tokenizer's encoder side** (:mod:`mae_scale.tokenizer_vqkd`),
e.g. the official ``vqkd_encoder_base_decoder_3x768x12_clip-*.pth`` as downloaded: a ``.pth``
holding ``{"model": state_dict}`` (or ``{"state_dict": ...}``, or a bare state dict) read with
``torch.load(weights_only=True)``, or a safetensors file of the state dict (keys
``encoder.patch_embed.proj.weight``, ``quantize.embedding.weight``, ...).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Protocol, Union

import torch

from mae_scale.models.patches import patchify

FORMAT = "mae-scale-patch-kmeans"
VERSION = "1"
NORMALISATION = ("imagenet-mean-std pixels, patch flattened (p,q,c), then per patch: "
                 "(x - mean) / sqrt(unbiased var + 1e-6), zero where var < 1e-6")
_VAR_EPS = 1.0e-6  # MAE's norm-pix epsilon
_DEAD_AFTER = 8  # a codeword is dead after DEAD_AFTER * vocab patches without a hit
_CHUNK_ELEMENTS = 1 << 24  # patches x codewords per distance chunk (64 MiB of fp32)

PathLike = Union[str, Path]


class Tokenizer(Protocol):
    """What the BEiT objective needs from a tokenizer."""

    patch_size: int
    vocab_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized float images [B, 3, H, W] -> token ids Long [B, H/p, W/p]."""
        ...


def normalized_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images [B, C, H, W] -> per-patch normalized patches fp32 [B, L, p*p*C] ((p, q, c) order)."""
    x = patchify(images.float(), patch_size)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    out = (x - mean) / (var + _VAR_EPS) ** 0.5
    # Flat patches (variance below eps) become exactly zero: otherwise the rounding residue of the
    # mean (or a single pixel one uint8 step off) would be blown up into an arbitrary pattern.
    return torch.where(var < _VAR_EPS, torch.zeros_like(out), out)


def nearest_codeword(patches: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """patches [N, D], codebook [K, D] -> ids Long [N], in chunks so memory stays bounded."""
    sq = (codebook * codebook).sum(dim=1)  # [K]; ||x||^2 is the same for every codeword
    rows = max(1, _CHUNK_ELEMENTS // codebook.shape[0])
    out = [torch.argmin(sq - 2.0 * chunk @ codebook.T, dim=1) for chunk in patches.split(rows)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=patches.device)


class PatchKMeansTokenizer:
    """Nearest-codeword tokenizer over per-patch-normalized 16x16 patches (see the module docstring)."""

    def __init__(self, codebook: torch.Tensor, patch_size: int = 16) -> None:
        if codebook.ndim != 2 or codebook.shape[1] != patch_size * patch_size * 3:
            raise ValueError(f"codebook must be [vocab, {patch_size * patch_size * 3}], got {tuple(codebook.shape)}")
        self.codebook = codebook.detach().float().contiguous()
        self.patch_size = patch_size
        self.vocab_size = codebook.shape[0]
        self._on: Dict[torch.device, torch.Tensor] = {}  # codebook copies per device, made once

    def _codebook_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.codebook.to(device)
        return self._on[device]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized float [B, 3, H, W] (any device) -> Long [B, H/p, W/p] on that device."""
        b, _, h, w = images.shape
        patches = normalized_patches(images, self.patch_size)  # [B, L, D]
        ids = nearest_codeword(patches.reshape(-1, patches.shape[-1]), self._codebook_on(images.device))
        return ids.reshape(b, h // self.patch_size, w // self.patch_size)

    @torch.no_grad()
    def decode_patches(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> their codewords [..., p*p*3] (normalized-patch space)."""
        return self._codebook_on(ids.device)[ids]

    def save(self, path: PathLike) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "version": VERSION, "patch_size": str(self.patch_size),
                "vocab": str(self.vocab_size), "normalisation": NORMALISATION}
        save_file({"codebook": self.codebook.cpu()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: PathLike) -> "PatchKMeansTokenizer":
        return load_tokenizer(path)


CONVERT_HINT = ("convert it to a state dict first, in your own trusted environment with the dall_e package: "
                "import torch, safetensors.torch; enc = torch.load('encoder.pkl', map_location='cpu', "
                "weights_only=False); safetensors.torch.save_file(enc.state_dict(), 'dalle_encoder.safetensors')")


def _torch_state_dict(text: str) -> Dict[str, torch.Tensor]:
    """A torch.save file read with weights_only=True (the restricted unpickler: no code runs)."""
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4" notes on a foreign pickle
            warnings.simplefilter("ignore")
            obj = torch.load(text, map_location="cpu", weights_only=True)
    except Exception:
        obj = None
    # A training checkpoint (BEiT v2's VQ-KD file: {"model": state_dict}): the restricted unpickler
    # has already refused any non-primitive entry, so only the state dict is taken out.
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise ValueError(f"refusing {text}: not a state dict of tensors readable with torch.load(weights_only="
                         "True) (a pickled module like DALL-E's encoder.pkl runs code when loaded); "
                         + CONVERT_HINT)
    return obj


def _external_tokenizer(names, load_state_dict: Callable[[], Dict[str, torch.Tensor]], text: str):
    """A DALL-E encoder or a BEiT v2 VQ-KD tokenizer, told apart by the file's key `names`, built
    from `load_state_dict()` and loaded strictly; None when the keys are neither's."""
    from mae_scale.tokenizer_vqkd import is_vqkd_state_dict

    if "blocks.input.w" in names:
        from mae_scale.tokenizer_dalle import DallEEncoder as Encoder, DallETokenizer as Wrapper, check_state_dict
        what = "a DALL-E encoder"
    elif is_vqkd_state_dict(names):
        from mae_scale.tokenizer_vqkd import VQKDEncoder as Encoder, VQKDTokenizer as Wrapper, check_state_dict
        what = "a BEiT v2 VQ-KD"
    else:
        return None
    sd = load_state_dict()
    try:
        encoder = Encoder(**Encoder.config_from_state_dict(sd))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{text}: not {what} state dict: {str(exc).splitlines()[0]}") from None
    encoder.load_state_dict(check_state_dict(encoder, sd, text), strict=True)
    return Wrapper(encoder)


_NEITHER = ("neither a DALL-E dVAE encoder (no blocks.input.w) nor a BEiT v2 VQ-KD tokenizer (no "
            "encoder.patch_embed.proj.weight + quantize.embedding.weight); other tokenizers are not implemented")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """A tokenizer from a local file: ours (:meth:`PatchKMeansTokenizer.save`), a DALL-E encoder
    or a BEiT v2 VQ-KD tokenizer.

    Supported: our patch k-means safetensors; a DALL-E dVAE encoder state dict (key
    ``blocks.input.w`` present) or a BEiT v2 VQ-KD state dict (keys
    ``encoder.patch_embed.proj.weight`` and ``quantize.embedding.weight``; its decoder and teacher
    keys are ignored) as safetensors or as a ``.pth`` read with ``torch.load(weights_only=True)``
    (a bare state dict, or one under ``"model"`` / ``"state_dict"`` as training checkpoints hold
    it), loaded strictly (hyper-parameters read off the shapes; a missing, unexpected or wrongly
    shaped key is a one-line ValueError naming it). Refused with a one-line ValueError: URLs,
    missing files, pickled modules (DALL-E's ``encoder.pkl``: never unpickled, the message gives
    the conversion), other files (other tokenizers are not implemented).
    """
    text = str(path)
    if "://" in text:
        raise ValueError(f"tokenizer must be a local file, not a URL: {text}")
    p = Path(text)
    if not p.is_file():
        raise ValueError(f"tokenizer file not found: {text}")
    with open(p, "rb") as f:
        head = f.read(8)
    # Pickle protocol >= 2 starts with 0x80 (raw pickles, legacy torch.save); torch.save writes a zip.
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        sd = _torch_state_dict(text)
        tokenizer = _external_tokenizer(sd, lambda: sd, text)
        if tokenizer is None:
            raise ValueError(f"{text} is a state dict but {_NEITHER}")
        return tokenizer
    from safetensors import safe_open

    try:
        with safe_open(text, framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            codebook = f.get_tensor("codebook") if "codebook" in names else None
    except Exception:  # any parse failure means: not a safetensors file
        raise ValueError(f"{text} is not a safetensors file; expected a tokenizer written by "
                         "`mae-scale tokenizer fit` (safetensors: codebook + metadata) or a DALL-E "
                         "encoder or BEiT v2 VQ-KD state dict") from None
    if meta.get("format") != FORMAT:
        from safetensors.torch import load_file

        tokenizer = _external_tokenizer(names, lambda: load_file(text), text)
        if tokenizer is not None:
            return tokenizer
    if meta.get("format") != FORMAT or codebook is None:
        raise ValueError(f"{text} is safetensors but not a mae-scale patch k-means tokenizer (format="
                         f"{meta.get('format')!r}), and {_NEITHER}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{text}: tokenizer format version {meta.get('version')!r}, this code reads {VERSION!r}")
    patch_size = int(meta["patch_size"])
    if codebook.shape != (int(meta["vocab"]), patch_size * patch_size * 3) or not torch.isfinite(codebook).all():
        raise ValueError(f"{text}: codebook {tuple(codebook.shape)} does not match its metadata or is not finite")
    return PatchKMeansTokenizer(codebook, patch_size)


@torch.no_grad()
def codebook_stats(tokenizer: PatchKMeansTokenizer, images: torch.Tensor) -> Dict[str, float]:
    """Quality on normalized images [B, 3, H, W]: share of codewords used, perplexity of the token
    histogram (exp of its entropy; at most vocab), mean squared error per value of each normalized
    patch against its codeword, and the same for the best single codeword (the patches' own mean,
    a baseline that is if anything favoured: it is fitted on the very patches it is scored on)."""
    patches = normalized_patches(images, tokenizer.patch_size).reshape(-1, 3 * tokenizer.patch_size**2)
    ids = nearest_codeword(patches, tokenizer._codebook_on(patches.device))
    counts = torch.bincount(ids, minlength=tokenizer.vocab_size).double()
    prob = counts / counts.sum()
    entropy = -(prob[prob > 0] * prob[prob > 0].log()).sum()
    rec = tokenizer._codebook_on(patches.device)[ids]
    return {
        "patches": float(patches.shape[0]),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "mse": float(((patches - rec) ** 2).mean()),
        "baseline_mse": float(((patches - patches.mean(dim=0)) ** 2).mean()),
    }


class _MiniBatchKMeans:
    """Sculley's mini-batch k-means with dead-codeword re-seeding (see the module docstring)."""

    def __init__(self, init: torch.Tensor, generator: torch.Generator) -> None:
        self.codebook = init.clone()  # [K, D]
        k = init.shape[0]
        self.counts = torch.zeros(k, dtype=torch.float64, device=init.device)  # patches each has taken
        self.seen = 0  # patches processed
        self.last_hit = torch.zeros(k, dtype=torch.long, device=init.device)  # `seen` at the last hit
        self.generator = generator
        self.reseeded = 0
        self.epoch_counts = torch.zeros(k, dtype=torch.float64, device=init.device)

    def update(self, patches: torch.Tensor) -> None:
        k = self.codebook.shape[0]
        ids = nearest_codeword(patches, self.codebook)  # assignments fixed for the batch, as Sculley
        n = torch.bincount(ids, minlength=k).double()  # [K]
        sums = torch.zeros_like(self.codebook, dtype=torch.float64).index_add_(0, ids, patches.double())
        self.counts += n
        self.epoch_counts += n
        hit = n > 0
        # Sequential 1/count steps over a batch add up to the running mean of everything assigned.
        delta = (sums[hit] - n[hit, None] * self.codebook[hit].double()) / self.counts[hit, None]
        self.codebook[hit] += delta.to(self.codebook.dtype)
        self.seen += patches.shape[0]
        self.last_hit[hit] = self.seen
        dead = torch.nonzero(self.seen - self.last_hit >= _DEAD_AFTER * k).flatten()
        if dead.numel():
            g = self.generator
            if dead.numel() <= patches.shape[0]:
                pick = torch.randperm(patches.shape[0], generator=g)[: dead.numel()]
            else:
                pick = torch.randint(patches.shape[0], (dead.numel(),), generator=g)
            self.codebook[dead] = patches[pick.to(patches.device)]
            self.counts[dead] = 1.0  # the seed patch counts as its first observation
            self.last_hit[dead] = self.seen
            self.reseeded += dead.numel()


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fit_tokenizer(
    shards: Union[PathLike, list],
    vocab: int,
    out: PathLike,
    *,
    patch_size: int = 16,
    input_size: int = 224,
    batch_size: int = 64,
    max_images: Optional[int] = None,
    epochs: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    device: Optional[str] = None,
) -> Dict[str, float]:
    """Fit a :class:`PatchKMeansTokenizer` on WebDataset shards, save it to ``out``, return a summary.

    Crops are the MAE augmentation (RandomResizedCrop 0.2-1 + flip) at ``input_size``, from the
    project's loader seeded by ``seed`` (epoch e uses loader epoch e), normalized on ``device``
    (default: CUDA if available). ``max_images`` caps the images used over all epochs. The same
    arguments on the same device give the same codebook.
    """
    from data_pipeline import MAEAugment, make_loader
    from mae_scale.visualize import normalize_on_device

    if vocab < 2 or epochs < 1 or input_size % patch_size:
        raise ValueError(f"need vocab >= 2, epochs >= 1 and input_size ({input_size}) divisible by "
                         f"patch_size ({patch_size}); got vocab={vocab}, epochs={epochs}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    augment = MAEAugment(input_size, scale=(0.2, 1.0))
    km: Optional[_MiniBatchKMeans] = None
    pending = []  # patches collected for the initial codebook
    images = 0
    per_epoch = None
    start = last_print = time.monotonic()
    for epoch in range(epochs):
        loader = make_loader(shards, batch_size, num_workers=num_workers, epoch=epoch, seed=seed,
                             input_size=input_size, augment=augment)
        per_epoch = per_epoch or loader.samples_per_epoch
        total = min(per_epoch * epochs, max_images or per_epoch * epochs)
        if km is not None:
            km.epoch_counts.zero_()
        for batch in loader:
            imgs = batch["image"][: total - images]
            if imgs.shape[0] == 0:
                break
            images += imgs.shape[0]
            x = normalize_on_device(imgs, dev)
            patches = normalized_patches(x, patch_size).reshape(-1, 3 * patch_size**2)
            if km is None:
                pending.append(patches)
                if sum(t.shape[0] for t in pending) < vocab:
                    continue
                patches = torch.cat(pending)
                pick = torch.randperm(patches.shape[0], generator=gen)[:vocab].to(dev)
                km = _MiniBatchKMeans(patches[pick], gen)
                pending = []
            km.update(patches)
            now = time.monotonic()
            if progress and (now - last_print >= 10 or images >= total):
                last_print = now
                rate = images / max(now - start, 1e-9)
                print(f"tokenizer fit: epoch {epoch + 1}/{epochs}  images {images}/{total}  "
                      f"{rate:.1f} img/s  ETA {_fmt_eta((total - images) / rate)}  "
                      f"re-seeded {km.reseeded}", flush=True)
        if images >= total:
            break
    if km is None:
        raise ValueError(f"only {sum(t.shape[0] for t in pending)} patches in {images} images, fewer than "
                         f"vocab={vocab}; use more images or a smaller vocabulary")
    tok = PatchKMeansTokenizer(km.codebook.cpu(), patch_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tok.save(tmp)
    tmp.replace(out)  # a fit stopped while saving leaves no half-written codebook under the name
    seconds = time.monotonic() - start
    prob = km.epoch_counts / km.epoch_counts.sum().clamp_min(1)
    entropy = -(prob[prob > 0] * prob[prob > 0].log()).sum()
    return {"out": str(out), "vocab": vocab, "images": images, "patches": km.seen, "seconds": seconds,
            "images_per_s": images / max(seconds, 1e-9), "reseeded": km.reseeded,
            # over the last epoch's assignments (codebook still moving): a training-side view only
            "usage": float((km.epoch_counts > 0).double().mean()), "perplexity": float(entropy.exp())}


# ---------------------------------------------------------------------- CLI
def _fit_command(args: argparse.Namespace) -> int:
    """Every check a fit can fail is made before the first image is read: a fit takes hours, and
    its output is written only at the end."""
    from mae_scale.cli import UserError
    from mae_scale.cli_args import check_output_file

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
    from mae_scale.cli_args import non_negative_int, positive_int

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
