"""Weighted k-NN classification of frozen features: the core of an online k-NN monitor.

During pretraining there is no classifier to read accuracy from; a k-NN classifier over the
encoder's features (a "bank" of labelled training features, scored with labelled queries) shows
whether the representation is improving, at the cost of a forward pass and a similarity search.

The rule is DINO's weighted k-NN (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", https://arxiv.org/abs/2104.14294, section 4.1 / appendix; also lightly's and
solo-learn's online k-NN): features are L2-normalized, each query takes its k = 20 most
cosine-similar bank features, neighbour i votes for its class with weight exp(sim_i / T),
T = 0.07, and the votes per class are summed; the predicted class is the one with most votes.

Normalization is done here (inputs need not be normalized; normalizing twice changes nothing),
in float32 whatever the input dtype, because bf16 similarities are too coarse to rank neighbours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mae_scale.distributed import all_reduce_sum

# Budget for each of the two per-chunk blocks (similarities, weighted one-hot votes): 64 MiB.
BLOCK_BYTES = 64 * 2**20
_FLOAT_BYTES = 4


def default_chunk_rows(bank_size: int, k: int, num_classes: int) -> int:
    """Query rows per chunk so that neither the [rows, bank_size] similarity block nor the
    [rows, k, num_classes] vote block exceeds BLOCK_BYTES (at least one row, whatever the size)."""
    widest = max(bank_size, k * num_classes, 1)
    return max(1, BLOCK_BYTES // (_FLOAT_BYTES * widest))


def weighted_knn_votes(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
                       num_classes: int, k: int = 20, temperature: float = 0.07,
                       chunk_rows: int | None = None) -> torch.Tensor:
    """Class votes [Q, C] (float32) of the weighted k-NN rule for each query.

    bank_feats [N, D], bank_labels [N] in [0, C), query_feats [Q, D]; any float dtype, normalized
    here. k is clipped to N (a bank smaller than k: every bank point votes).

    Memory: queries are scored `chunk_rows` at a time, so besides the normalized float32 copies
    of bank [N, D] and queries [Q, D] and the result [Q, C], the peak extra memory is
    chunk_rows x N floats (the similarity block) + chunk_rows x k x C floats (weighted one-hot
    votes). By default (`chunk_rows=None`) chunk_rows = 64 MiB / (4 bytes x max(N, k x C)), so
    each block stays <= 64 MiB (<= 128 MiB together) unless a single row is already larger.

    Chunking changes nothing but the rounding of the similarity matmul: the BLAS may pick another
    kernel for another chunk shape (MKL on CPU: a 1-row chunk goes through gemv, 1 ulp apart from
    gemm, which exp(sim / T) magnifies 1/T times). The same holds for how the distributed version's
    queries are split over ranks: only a near-tie between two classes' votes could turn on it.
    """
    if bank_feats.ndim != 2 or query_feats.ndim != 2 or bank_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"features must be [N, D] and [Q, D]; got {tuple(bank_feats.shape)} and "
                         f"{tuple(query_feats.shape)}")
    if bank_labels.shape != bank_feats.shape[:1]:
        raise ValueError(f"bank_labels must be [N]={bank_feats.shape[0]}; got {tuple(bank_labels.shape)}")
    if k < 1 or not temperature > 0 or (chunk_rows is not None and chunk_rows < 1):
        raise ValueError(f"need k >= 1, temperature > 0, chunk_rows >= 1; got {k}, {temperature}, {chunk_rows}")
    n = bank_feats.shape[0]
    if n == 0:
        raise ValueError("the k-NN bank is empty")
    if bool((bank_labels < 0).any()) or bool((bank_labels >= num_classes).any()):
        # scatter would fail (CPU) or corrupt memory / assert asynchronously (CUDA) on a bad label
        raise ValueError(f"bank labels must be in [0, {num_classes}); got "
                         f"{int(bank_labels.min())}..{int(bank_labels.max())}")
    k = min(k, n)
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(n, k, num_classes)
    bank = F.normalize(bank_feats.detach().float(), dim=1)  # [N, D]
    queries = F.normalize(query_feats.detach().float(), dim=1).to(bank.device)  # [Q, D]
    labels = bank_labels.to(bank.device, torch.long)  # [N]
    votes = torch.zeros(queries.shape[0], num_classes, device=bank.device)  # [Q, C]
    for start in range(0, queries.shape[0], rows):
        sims = queries[start:start + rows] @ bank.T  # [r, N] cosine similarities
        top_sims, top_idx = sims.topk(k, dim=1)  # [r, k]
        del sims  # free the big block before the vote block is allocated
        weights = (top_sims / temperature).exp()  # [r, k]
        # Weighted one-hot by scatter_ into distinct slots (no atomics: deterministic on GPU too).
        one_hot = torch.zeros(*top_idx.shape, num_classes, device=bank.device)  # [r, k, C]
        one_hot.scatter_(2, labels[top_idx].unsqueeze(2), weights.unsqueeze(2))
        votes[start:start + rows] = one_hot.sum(1)  # [r, C]
    return votes


def _hit_counts(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
                query_labels: torch.Tensor, num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """[top-1 hits, top-5 hits, queries] as int64 on the bank's device (summable over ranks)."""
    if query_labels.shape != query_feats.shape[:1]:
        raise ValueError(f"query_labels must be [Q]={query_feats.shape[0]}; got {tuple(query_labels.shape)}")
    votes = weighted_knn_votes(bank_feats, bank_labels, query_feats, num_classes, k, temperature)  # [Q, C]
    top = votes.topk(min(5, num_classes), dim=1).indices  # [Q, min(5, C)]; 5 > C would raise
    hits = top == query_labels.to(votes.device, torch.long).unsqueeze(1)  # [Q, min(5, C)]
    return torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                        torch.tensor(query_feats.shape[0], device=votes.device)]).long()


def _as_figures(counts: torch.Tensor) -> dict:
    """Percentages from [top-1 hits, top-5 hits, n]; NaN when there was no query at all."""
    top1, top5, n = (int(c) for c in counts.tolist())
    pct = (lambda hits: 100.0 * hits / n) if n else (lambda hits: math.nan)
    return {"top1": pct(top1), "top5": pct(top5), "samples": n}


def knn_accuracy(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict:
    """{top1: %, top5: %, samples: int} of the weighted k-NN rule in this process alone.

    top5 is top-min(5, C): with fewer than 5 classes it is top-C (always 100 %)."""
    return _as_figures(_hit_counts(bank_feats, bank_labels, query_feats, query_labels, num_classes, k,
                                   temperature))


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' x [n_r, ...] concatenated in rank order [sum n_r, ...]. all_gather needs equal
    shapes, so each share is padded to the largest and the padding cut off again."""
    pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
    padded = torch.cat([x, pad]).contiguous()  # [max n_r, ...]
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def distributed_knn_accuracy(local_bank_feats: torch.Tensor, local_bank_labels: torch.Tensor,
                             local_query_feats: torch.Tensor, local_query_labels: torch.Tensor,
                             num_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    """knn_accuracy over the union of every rank's bank and queries; identical on every rank.

    A collective: call it on every rank. Each rank holds its own share of the bank and of the
    queries (uneven shares allowed, zero rows included). The bank is all-gathered, so every rank
    scores its own queries against the whole bank (each rank then holds all N x D bank features);
    the hit and query counts are summed by one all_reduce, so every query counts exactly once.
    Tensors must live where the backend communicates (a GPU under nccl); work stays on the
    features' device. Without an initialized process group (or in a world of one) it is
    `knn_accuracy`. Errors on bad bank labels or an empty bank are raised on every rank alike,
    since they are checked on the gathered bank.
    """
    if _world_size() == 1:
        return knn_accuracy(local_bank_feats, local_bank_labels, local_query_feats, local_query_labels,
                            num_classes, k, temperature)
    device = local_bank_feats.device
    # Shares differ in size: every rank learns all sizes first, to pad and to cut the padding.
    size = torch.tensor([local_bank_feats.shape[0]], device=device)
    sizes = [torch.zeros_like(size) for _ in range(_world_size())]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    bank = _gather_rows(local_bank_feats.detach(), sizes)  # [N, D], rank order
    labels = _gather_rows(local_bank_labels.to(device, torch.long), sizes)  # [N]
    counts = _hit_counts(bank, labels, local_query_feats.to(device), local_query_labels, num_classes, k,
                         temperature)
    return _as_figures(all_reduce_sum(counts))


def encoder_features(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both k-NN features of encoder output tokens [B, 1 + L, D] (class token first):
    `cls` = tokens[:, 0] and `mean` = tokens[:, 1:].mean(1) (patch tokens only), each [B, D],
    L2-normalized, float32 and detached (a bank must not keep the autograd graph alive)."""
    if tokens.ndim != 3 or tokens.shape[1] < 2:
        raise ValueError(f"need tokens [B, 1 + L, D] with L >= 1; got {tuple(tokens.shape)}")
    tokens = tokens.detach().float()
    return {"cls": F.normalize(tokens[:, 0], dim=1), "mean": F.normalize(tokens[:, 1:].mean(1), dim=1)}
