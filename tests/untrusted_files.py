"""Files a loader must refuse without running them (shared by the weights, tokenizer and resume tests)."""

from __future__ import annotations

import pytest


class WritesFileOnLoad:
    """Unpickling this creates a file: the proof that a loader executed code from its input."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tokenizer_refusal(path) -> str:
    """`load_tokenizer(path)`'s error, which must be one line."""
    from mae_scale.tokenizers import load_tokenizer

    with pytest.raises(ValueError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert "\n" not in message
    return message
