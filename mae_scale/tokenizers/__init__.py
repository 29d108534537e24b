"""Visual tokenizers for BEiT-style targets: a token id per patch of the crop the model sees.

- `sniff.py`: the `Tokenizer` protocol (what the BEiT objective needs) and `load_tokenizer`, which
  tells a file's kind from its bytes and keys and never runs code from it.
- `kmeans.py`: our patch k-means codebook, fitted by `mae-scale tokenizer fit`.
- `dalle.py`: the DALL-E dVAE encoder (BEiT v1's tokenizer) from a state dict you bring.
- `vqkd.py`: the BEiT v2 VQ-KD tokenizer's encoder side.
"""

from mae_scale.tokenizers.kmeans import PatchKMeansTokenizer, codebook_stats, fit_tokenizer
from mae_scale.tokenizers.sniff import Tokenizer, load_tokenizer

__all__ = ["PatchKMeansTokenizer", "codebook_stats", "fit_tokenizer", "Tokenizer", "load_tokenizer"]
