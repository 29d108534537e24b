"""Which tokenizer a file holds, told apart by its bytes and keys, and loaded without running code.

:func:`load_tokenizer` loads our patch k-means codebook (`kmeans.py`), and the **DALL-E dVAE encoder** (BEiT v1's tokenizer,
:mod:`mae_scale.tokenizers.dalle`) from a local *state dict*: a safetensors file, or a ``.pth``
that ``torch.load(weights_only=True)`` reads (a dict of tensors, never arbitrary objects), whose
keys are the official encoder's (``blocks.input.w``, ...). It refuses everything else with one
line: URLs (local files only), missing files, pickled modules such as DALL-E's ``encoder.pkl``
(unpickling runs code; convert it to a state dict first, see :mod:`mae_scale.tokenizers.dalle`),
other pickles, and other safetensors files.

It also loads the **BEiT v2 VQ-KD tokenizer's encoder side** (:mod:`mae_scale.tokenizers.vqkd`),
e.g. the official ``vqkd_encoder_base_decoder_3x768x12_clip-*.pth`` as downloaded: a ``.pth``
holding ``{"model": state_dict}`` (or ``{"state_dict": ...}``, or a bare state dict) read with
``torch.load(weights_only=True)``, or a safetensors file of the state dict (keys
``encoder.patch_embed.proj.weight``, ``quantize.embedding.weight``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Protocol

import torch

from mae_scale.tokenizers.kmeans import FORMAT, PatchKMeansTokenizer, PathLike


class Tokenizer(Protocol):
    """What the BEiT objective needs from a tokenizer."""

    patch_size: int
    vocab_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized float images [B, 3, H, W] -> token ids Long [B, H/p, W/p]."""
        ...


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
    from mae_scale.tokenizers.vqkd import is_vqkd_state_dict

    if "blocks.input.w" in names:
        from mae_scale.tokenizers.dalle import DallEEncoder as Encoder, DallETokenizer as Wrapper, check_state_dict
        what = "a DALL-E encoder"
    elif is_vqkd_state_dict(names):
        from mae_scale.tokenizers.vqkd import VQKDEncoder as Encoder, VQKDTokenizer as Wrapper, check_state_dict
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
    return PatchKMeansTokenizer.from_file(text, meta, codebook)
