"""Comparing loader outputs in the data tests."""

import torch


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """Same keys, labels and images, bitwise, batch by batch."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["label"], y["label"])
        assert torch.equal(x["image"], y["image"])
