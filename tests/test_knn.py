"""The weighted k-NN monitor (mae_scale.knn): the rule itself on cases with known answers, chunking,
and the distributed version against the single-process one (2 gloo processes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mae_scale.knn import (default_chunk_rows, distributed_knn_accuracy, encoder_features, knn_accuracy,
                           weighted_knn_votes)


def blobs(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    """Gaussian blobs around orthogonal directions (the first num_classes axes), class-sorted:
    feats [n_per_class * C, dim], labels [n_per_class * C]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    centres = torch.eye(num_classes, dim)  # [C, dim], orthonormal rows
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def test_separated_clusters_are_all_right():
    bank, bank_labels = blobs(50, 4, 16, noise=0.05, seed=0)
    queries, query_labels = blobs(25, 4, 16, noise=0.05, seed=1)
    figures = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=4)
    assert figures == {"top1": 100.0, "top5": 100.0, "samples": 100}


def test_shuffled_labels_score_chance():
    g = torch.Generator().manual_seed(0)
    n_bank, n_query, classes = 2000, 1000, 10
    bank, queries = torch.randn(n_bank, 32, generator=g), torch.randn(n_query, 32, generator=g)
    bank_labels = torch.randint(classes, (n_bank,), generator=g)[torch.randperm(n_bank, generator=g)]
    query_labels = torch.randint(classes, (n_query,), generator=g)
    figures = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=classes)
    # Chance is 1/C for top-1 and 5/C for top-5; 5 binomial standard deviations on n_query queries.
    for name, p in (("top1", 1 / classes), ("top5", 5 / classes)):
        margin = 5 * 100 * math.sqrt(p * (1 - p) / n_query)
        assert abs(figures[name] - 100 * p) < margin, (name, figures)
    assert figures["samples"] == n_query


def test_chunking_gives_the_same_votes():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 24, generator=g), torch.randn(53, 24, generator=g)
    labels = torch.randint(7, (300,), generator=g)
    whole = weighted_knn_votes(bank, labels, queries, 7, chunk_rows=53)
    assert default_chunk_rows(300, 20, 7) >= 53  # the default is one chunk here
    assert torch.equal(weighted_knn_votes(bank, labels, queries, 7), whole)
    # Bit for bit when every chunk has >= 2 rows (53 = 3 x 16 + 5 = 7 x 7 + 4 = 10 x 5 + 3): a GEMM
    # computes each output element alike whatever the row count (MKL on CPU, as observed).
    for rows in (3, 5, 7, 16, 1000):
        assert torch.equal(weighted_knn_votes(bank, labels, queries, 7, chunk_rows=rows), whole), rows
    # A 1-row chunk (53 = 52 + 1, 26 x 2 + 1, all ones) goes through gemv instead: the similarity may be
    # 1 ulp off, which exp(sim / T) magnifies 1/T = 14 times; the neighbours are the same.
    for rows in (1, 2, 52):
        torch.testing.assert_close(weighted_knn_votes(bank, labels, queries, 7, chunk_rows=rows), whole,
                                   rtol=1e-5, atol=0)


def test_default_chunk_keeps_blocks_within_64_mib():
    budget = 64 * 2**20 // 4  # floats
    for n, k, c in ((1_281_167, 20, 1000), (1000, 20, 1000), (10, 20, 5), (50_000_000, 20, 10)):
        rows = default_chunk_rows(n, k, c)
        assert rows >= 1
        assert rows == 1 or (rows * n <= budget and rows * k * c <= budget), (n, k, c, rows)


def test_tiny_case_by_hand():
    # Unnormalized on purpose: the rule normalizes. Directions: (1,0), (0,1), (1,1)/sqrt 2.
    bank = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[5.0, 0.0]])
    t = 0.5
    # Cosine similarities 1, 0, 1/sqrt 2: k=2 keeps bank points 0 (class 0) and 2 (class 1).
    votes = weighted_knn_votes(bank, labels, query, num_classes=3, k=2, temperature=t)
    expected = torch.tensor([[math.exp(1 / t), math.exp(1 / math.sqrt(2) / t), 0.0]])
    torch.testing.assert_close(votes, expected, rtol=1e-6, atol=0)
    # k beyond the bank size: every bank point votes (point 1 adds exp(0) to class 1).
    votes = weighted_knn_votes(bank, labels, query, num_classes=3, k=10, temperature=t)
    expected[0, 1] += 1.0
    torch.testing.assert_close(votes, expected, rtol=1e-6, atol=0)


def test_top5_with_fewer_than_5_classes():
    # Overlapping blobs: top-1 misses some, top-"5" is top-3 of 3 classes and cannot miss.
    bank, bank_labels = blobs(40, 3, 8, noise=0.8, seed=0)
    queries, query_labels = blobs(40, 3, 8, noise=0.8, seed=1)
    figures = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=3)
    assert 33.3 < figures["top1"] < 100.0
    assert figures["top5"] == 100.0
    # Two classes, one query: top-2 of 2.
    figures = knn_accuracy(bank[:2], torch.tensor([0, 1]), queries[:1], torch.tensor([1]), num_classes=2, k=1)
    assert figures["top5"] == 100.0 and figures["samples"] == 1


def test_bad_bank_labels_and_empty_bank_raise():
    feats = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        weighted_knn_votes(feats, torch.tensor([0, 1, 2, 3]), feats, num_classes=3)
    with pytest.raises(ValueError, match="empty"):
        weighted_knn_votes(feats[:0], torch.tensor([], dtype=torch.long), feats, num_classes=3)


def test_encoder_features():
    tokens = torch.randn(3, 1 + 5, 8, dtype=torch.bfloat16, requires_grad=True)
    feats = encoder_features(tokens)
    ref = tokens.detach().float()
    torch.testing.assert_close(feats["cls"], F.normalize(ref[:, 0], dim=1))
    torch.testing.assert_close(feats["mean"], F.normalize(ref[:, 1:].mean(1), dim=1))
    for f in feats.values():
        assert f.shape == (3, 8) and f.dtype == torch.float32 and not f.requires_grad
        torch.testing.assert_close(f.norm(dim=1), torch.ones(3))


def test_distributed_without_a_group_is_the_single_process_rule():
    bank, bank_labels = blobs(30, 5, 16, noise=0.7, seed=0)
    queries, query_labels = blobs(10, 5, 16, noise=0.7, seed=1)
    assert distributed_knn_accuracy(bank, bank_labels, queries, query_labels, 5, 20, 0.07) == \
        knn_accuracy(bank, bank_labels, queries, query_labels, 5)


# -- two gloo processes ----------------------------------------------------------------------------


def dist_cases():
    """(bank feats, bank labels, query feats, query labels, bank rows per rank, query rows per rank, C).
    A: bank sorted by class and split so that rank 0 holds classes 0-1 and rank 1 classes 2-3: a
    rank scoring against its own share only would miss the others' classes (and not reach 100 %).
    B: noisy overlapping blobs, rank 0 holds no bank at all, uneven queries 7 + 3."""
    bank_a, labels_a = blobs(10, 4, 16, noise=0.05, seed=2)
    queries_a, query_labels_a = blobs(2, 4, 16, noise=0.05, seed=3)
    bank_b, labels_b = blobs(8, 5, 16, noise=0.9, seed=4)
    queries_b, query_labels_b = blobs(2, 5, 16, noise=0.9, seed=5)
    return [(bank_a, labels_a, queries_a[:7], query_labels_a[:7], (20, 20), (7, 0), 4),
            (bank_b, labels_b, queries_b, query_labels_b, (0, 40), (7, 3), 5)]


def _share(x: torch.Tensor, counts: tuple[int, int], rank: int) -> torch.Tensor:
    return x[sum(counts[:rank]):sum(counts[:rank + 1])]


def _dist_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A FileStore rendezvous: no port and no environment variables, in this process or the parent.
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = []
    for bank, labels, queries, query_labels, bank_split, query_split, classes in dist_cases():
        results.append(distributed_knn_accuracy(
            _share(bank, bank_split, rank), _share(labels, bank_split, rank),
            _share(queries, query_split, rank), _share(query_labels, query_split, rank), classes, 20, 0.07))
    with open(f"{out_dir}/{rank}.json", "w") as f:
        json.dump(results, f)
    from mae_scale.distributed import exit_process, shutdown_distributed

    shutdown_distributed()
    exit_process(0)  # no interpreter finalization after gloo (see mae_scale.distributed)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_distributed_equals_single_process_on_both_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expected = [knn_accuracy(bank, labels, queries, query_labels, classes)
                for bank, labels, queries, query_labels, _, _, classes in dist_cases()]
    assert expected[0]["top1"] == 100.0  # case A is only right with the whole bank
    assert expected[1]["top1"] < 100.0  # case B has misses to get wrong
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == expected, rank
        assert [g["samples"] for g in got] == [7, 10]
