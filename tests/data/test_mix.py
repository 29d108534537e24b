"""A weighted mix of sources: exact shares, exactly once when weights match sizes, equal rank
lengths, exact mid-epoch resume, and a small heavy source repeating only after a full cycle."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from batch_asserts import assert_same_batches, keys_of

from data_pipeline import DataInputError, MAEAugment, make_loader
from data_pipeline.mix import resolve_mix

SIZE = 32
B = 4


@pytest.fixture
def sources(shard_dir: Path) -> tuple[list[str], list[str]]:
    tars = sorted(str(p) for p in shard_dir.glob("*.tar"))  # 6 shards of 8
    return tars[:2], tars[2:]  # 16 and 32 samples


def _keys(tars):
    from data_pipeline.shard_read import read_shard

    return [k for u in tars for _, k, _ in read_shard(u, want=lambda i: False)]


def test_weights_equal_to_sizes_see_every_sample_once(sources):
    a, b = sources
    mix = [{"shards": a, "weight": 16, "name": "a"}, {"shards": b, "weight": 32, "name": "b"}]
    seen, shares, lengths = [], Counter(), set()
    for rank in range(2):
        ld = make_loader(mix, B, rank=rank, world_size=2, num_workers=2, augment=MAEAugment(SIZE))
        full = list(ld)
        lengths.add(len(full))
        seen += keys_of(full)
        shares.update(ld.source_counts)
        resumed = list(make_loader(mix, B, rank=rank, world_size=2, num_workers=2, augment=MAEAugment(SIZE),
                                   skip_samples=3 * B))
        assert_same_batches(resumed, full[3:])
    assert lengths == {6} and sorted(seen) == sorted(_keys(a) + _keys(b))
    assert shares == {"a": 16, "b": 32}


def test_small_heavy_source_repeats_only_after_a_cycle(sources):
    a, b = sources
    mix = resolve_mix([{"shards": a, "weight": 3.0}, {"shards": b, "weight": 1.0}], epoch_samples=40)
    assert mix.quotas() == [30, 10]
    ld = make_loader(mix, B, augment=MAEAugment(SIZE), shuffle_buffer=1)
    got = keys_of(list(ld))
    from_a = Counter(k for k in got if k in set(_keys(a)))
    assert sum(from_a.values()) == 30 and set(from_a) == set(_keys(a))  # all 16 once, 14 twice
    assert sorted(Counter(from_a.values()).items()) == [(1, 2), (2, 14)]
    assert len(got) == 40 and ld.source_counts == {mix.sources[0].name: 30, mix.sources[1].name: 10}
    # another epoch, another draw of positions and of each source's order
    other = keys_of(list(make_loader(mix, B, augment=MAEAugment(SIZE), shuffle_buffer=1, epoch=1)))
    assert other != got


def test_bad_sources_are_refused_in_one_line(sources, tmp_path):
    a, _ = sources
    for spec, text in (([{"shards": a, "weight": 0}], "positive finite"),
                       ([{"shards": a, "weight": float("nan")}], "positive finite"),
                       ([{"shards": a, "weight": 1, "x": 2}], "must be"),
                       ([{"shards": a, "name": "s"}, {"shards": a, "name": "s"}], "unique")):
        with pytest.raises(DataInputError, match=text) as e:
            resolve_mix(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="resampled"):
        make_loader([{"shards": a, "weight": 1}], B, resampled=True)
