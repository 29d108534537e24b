"""Discrete visual tokens for BEiT-style pretraining: a patch k-means codebook, fitted here.

BEiT (https://arxiv.org/abs/2106.08254) predicts, for each masked patch, the id that a tokenizer
gives the same crop. BEiT uses the DALL-E dVAE encoder (BEiT-v2 a VQ-KD encoder); no such weights
can be downloaded here, so this module fits its own tokenizer (`mae_scale.tokenizers` also loads a
DALL-E or BEiT v2 VQ-KD encoder you bring):

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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Union

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
        """A file written by `save` (any other file: `mae_scale.tokenizers.load_tokenizer`)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "codebook" not in set(f.keys()):
                raise ValueError(f"{path} is not a mae-scale patch k-means tokenizer (format={meta.get('format')!r})")
            return cls.from_file(str(path), meta, f.get_tensor("codebook"))

    @classmethod
    def from_file(cls, text: str, meta: dict, codebook: torch.Tensor) -> "PatchKMeansTokenizer":
        """The tokenizer of a file's metadata and codebook, both checked."""
        if meta.get("version") != VERSION:
            raise ValueError(f"{text}: tokenizer format version {meta.get('version')!r}, this code reads {VERSION!r}")
        patch_size = int(meta["patch_size"])
        if codebook.shape != (int(meta["vocab"]), patch_size * patch_size * 3) or not torch.isfinite(codebook).all():
            raise ValueError(f"{text}: codebook {tuple(codebook.shape)} does not match its metadata or is not finite")
        return cls(codebook, patch_size)


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
