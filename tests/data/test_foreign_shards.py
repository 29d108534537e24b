"""Shards written by other tools: counted without reading their data, streamed exactly once per
epoch, resumed exactly mid-epoch; and our shards read by webdataset and wids themselves."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from batch_asserts import assert_same_batches, keys_of

import data_pipeline.shard_read as shard_read
import data_pipeline.tarscan as tarscan
from data_pipeline import (DataInputError, MAEAugment, TooManyBadSamples, make_loader, resolve_shards,
                           verify_shards, write_shards)
from data_pipeline.index import index_shards
from data_pipeline.shard_read import read_shard

SIZE = 32
B = 4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    # header counts are cached per folder; a shared cache would let a test pass on another's count
    monkeypatch.setenv("MAE_SCALE_INDEX_CACHE", str(tmp_path / "index-cache"))


class _Counting:
    total = 0  # bytes read through every file the header scanner opened


@pytest.fixture
def reads(monkeypatch):
    """Bytes read while counting, counted around the header scanner's reads; any full read of a
    shard (the streaming reader) during resolve is refused."""
    real_open = tarscan._open
    _Counting.total = 0

    def counting_open(path):
        f = real_open(path)
        real_read = f.read_at

        def read_at(offset, n):
            b = real_read(offset, n)
            _Counting.total += len(b)
            return b

        f.read_at = read_at
        return f

    monkeypatch.setattr(tarscan, "_open", counting_open)

    def no_stream(url, *a, **k):
        raise AssertionError(f"{url} was read in full to count it")

    # counting a shard by streaming it goes through shard_read.count_shard -> read_shard; the
    # loaders hold their own reference, so streaming the epoch is not affected
    monkeypatch.setattr(shard_read, "read_shard", no_stream)
    return _Counting


def _images(sample_dir: Path) -> list[tuple[int, bytes]]:
    paths = sorted(sample_dir.rglob("*.JPEG"))
    classes = sorted({p.parent.name for p in paths})
    return [(classes.index(p.parent.name), p.read_bytes()) for p in paths]


def _tar_bytes(urls) -> int:
    return sum(Path(u.removeprefix("pipe:cat ")).stat().st_size for u in urls)


def _check_stream(spec, expected_keys, **kw):
    """Exactly once over an epoch on 2 ranks; a resume mid-epoch gives the very same batches."""
    aug = MAEAugment(SIZE)
    seen = []
    for rank in range(2):
        full = list(make_loader(spec, B, rank=rank, world_size=2, augment=aug, **kw))
        seen += keys_of(full)
        resumed = list(make_loader(spec, B, rank=rank, world_size=2, augment=aug, skip_samples=2 * B, **kw))
        assert_same_batches(resumed, full[2:])
    assert sorted(seen) == sorted(expected_keys)
    return full


def test_webdataset_shardwriter_counted_from_headers(sample_dir, tmp_path, reads):
    d = tmp_path / "wds"
    d.mkdir()
    imgs = _images(sample_dir)
    with wds.ShardWriter(str(d / "part-%04d.tar"), maxcount=10, verbose=0) as w:
        for i, (label, jpg) in enumerate(imgs):
            w.write({"__key__": f"s{i:04d}", "jpg": jpg, "cls": label})
    ss = resolve_shards(str(d))
    assert ss.counts == (10, 10, 10, 10, 8)
    assert 0 < reads.total < _tar_bytes(ss.urls) / 5  # headers only
    before = reads.total
    assert resolve_shards(str(d)).counts == ss.counts and reads.total == before  # cached, not re-read
    assert sorted(p.name for p in d.iterdir()) == [f"part-{i:04d}.tar" for i in range(5)]  # nothing written there
    full = _check_stream(str(d), [f"s{i:04d}" for i in range(len(imgs))])
    assert full[0]["label"].min() >= 0


def test_timm_info_json_needs_no_tar_read(sample_dir, tmp_path, reads):
    d = tmp_path / "timm"
    d.mkdir()
    imgs = _images(sample_dir)
    lengths = [16, 16, 16]
    names = [f"imagenet1k-train-{i:04d}.tar" for i in range(3)]
    for i, name in enumerate(names):
        with wds.TarWriter(str(d / name)) as w:
            for j in range(sum(lengths[:i]), sum(lengths[:i + 1])):
                w.write({"__key__": f"n{j:05d}", "jpg": imgs[j][1], "cls": imgs[j][0], "json": {"i": j}})
    (d / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": {"train": {
        "name": "train", "num_samples": 48, "filenames": names, "shard_lengths": lengths}}}))
    ss = resolve_shards(str(d / "imagenet1k-train-{0000..0002}.tar"))
    assert ss.counts == tuple(lengths) and reads.total == 0
    assert resolve_shards(str(d)).counts == tuple(lengths) and reads.total == 0
    assert resolve_shards(str(d / "_info.json")).counts == tuple(lengths)
    _check_stream(str(d), [f"n{j:05d}" for j in range(48)])


def test_img2dataset_with_gaps_and_stats(sample_dir, tmp_path, reads):
    d = tmp_path / "i2d"
    d.mkdir()
    imgs = _images(sample_dir)
    keys = []
    for shard in range(2):
        ok = [k for k in range(shard * 30, shard * 30 + 30) if k % 3 != 1][:20]  # failed downloads leave gaps
        with tarfile.open(d / f"{shard:05d}.tar", "w") as tf:
            for k in ok:
                for ext, data in (("jpg", imgs[k % len(imgs)][1]), ("txt", b"a caption"),
                                  ("json", json.dumps({"key": f"{k:09d}", "status": "success"}).encode())):
                    ti = tarfile.TarInfo(f"{k:09d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
                keys.append(f"{k:09d}")
        (d / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": 30, "successes": len(ok), "failed_to_download": 30 - len(ok)}))
    ss = resolve_shards(str(d / "{00000..00001}.tar"))
    assert ss.counts == (20, 20) and reads.total == 0
    full = _check_stream(str(d / "{00000..00001}.tar"), keys)
    assert (full[0]["label"] == -1).all()  # no label member: unlabelled


def test_compound_keys_and_json_labels(sample_dir, tmp_path, reads):
    d = tmp_path / "compound"
    d.mkdir()
    imgs = _images(sample_dir)
    with wds.ShardWriter(str(d / "seg-%03d.tar"), maxcount=12, verbose=0) as w:
        for i, (label, jpg) in enumerate(imgs):
            # the segmentation mask comes first in the tar: the configured key still wins
            w.write({"__key__": f"c{i:03d}", "seg.png": b"not the image", "input.jpg": jpg,
                     "json": {"label": label if i % 5 else -1}})
    ss = resolve_shards(str(d))
    assert ss.counts == (12, 12, 12, 12) and 0 < reads.total < _tar_bytes(ss.urls) / 5
    kw = {"image_key": "input.jpg;seg.png", "label_key": "json:label"}
    _check_stream(str(d), [f"c{i:03d}" for i in range(len(imgs))], **kw)
    ld = make_loader(str(d), B, augment=MAEAugment(SIZE), shuffle_buffer=1, **kw)
    batches = list(ld)
    want = {f"c{i:03d}": (label if i % 5 else -1) for i, (label, _) in enumerate(imgs)}
    assert all(want[k] == int(lab) for b in batches for k, lab in zip(b["key"], b["label"]))
    assert ld.unlabelled == sum(v < 0 for v in want.values()) and not ld.bad_counts
    # with the default keys, no member is an image ("input.jpg" is not "jpg"): every sample is bad
    with pytest.raises(TooManyBadSamples):
        list(make_loader(str(d), B, augment=MAEAugment(SIZE)))


def test_pipe_shards_need_an_index(shard_dir, tmp_path, capsys):
    urls = [f"pipe:cat {p}" for p in sorted(shard_dir.glob("*.tar"))]
    with pytest.raises(DataInputError, match="mae-scale data index") as e:
        resolve_shards(urls, read_remote=False)  # what the trainers' config check does, before any work
    assert "\n" not in str(e.value)
    m = index_shards(urls, tmp_path / "remote.json", progress=False)
    assert m["read"]["streamed"] == len(urls)  # a pipe cannot seek: read once, and it says so
    assert resolve_shards(str(tmp_path / "remote.json")).urls == tuple(urls)
    (tmp_path / "idx").mkdir()
    index_shards(urls, tmp_path / "idx" / "manifest.json", progress=False)
    assert verify_shards(tmp_path / "idx") == []  # data verify streams the pipe: entries
    keys = [k for u in urls for _, k, _ in read_shard(u, want=lambda i: False)]
    _check_stream(str(tmp_path / "remote.json"), keys)
    # resampled mode needs no counts at all
    ld = make_loader(urls, B, augment=MAEAugment(SIZE), resampled=True, epoch_samples=24)
    got = keys_of(list(ld))
    assert len(got) == 24 and set(got) <= set(keys)
    again = keys_of(list(make_loader(urls, B, augment=MAEAugment(SIZE), resampled=True, epoch_samples=24,
                                     skip_samples=2 * B)))
    assert again == got[2 * B:]


def test_our_shards_read_by_webdataset_and_wids(sample_dir, tmp_path):
    out = tmp_path / "ours"
    write_shards(sample_dir, out, samples_per_shard=10, progress=False)
    ours = {k: (m["jpg"], m["cls"]) for u in sorted(out.glob("*.tar")) for _, k, m in read_shard(str(u))}
    ds = wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False, empty_check=False)
    theirs = {s["__key__"]: (s["jpg"], s["cls"]) for s in ds}
    assert theirs == ours and len(ours) == 48
    import wids  # a test dependency ([test] extra): reading our shards with it is the point

    wd = wids.ShardListDataset(str(out / "shardindex.json"), transformations=[], cache_dir=str(tmp_path / "wc"))
    assert len(wd) == 48
    got = {wd[i]["__key__"]: (wd[i][".jpg"].read() if hasattr(wd[i][".jpg"], "read") else wd[i][".jpg"],
                              wd[i][".cls"].read() if hasattr(wd[i][".cls"], "read") else wd[i][".cls"])
           for i in range(len(wd))}
    assert {k.lstrip("/"): v for k, v in got.items()} == ours
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert info["num_samples"] == 48 and sum(info["shard_lengths"]) == 48
    assert resolve_shards(str(out / "_info.json")).counts == resolve_shards(str(out)).counts


def test_header_count_agrees_with_the_stream_reader_on_every_tar_flavour(tmp_path):
    """Long names (PAX and GNU), ustar prefixes, directories, links, a compressed tar: the header
    count groups members exactly as the streaming reader does (or falls back to it)."""
    import gzip

    from data_pipeline.tario import count_tar_samples
    from data_pipeline.tarscan import count_local_tar

    long_dir = "d" * 120
    names = [f"{long_dir}/a.jpg", f"{long_dir}/a.cls", "dir/", "b.input.jpg", "b.seg.png", "b.json",
             "x" * 90 + "/" + "c" * 60 + ".jpg", "ünï.jpg", "ünï.cls", ".hidden.jpg", "link.jpg", "e"]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for n in names:
                if fmt == tarfile.USTAR_FORMAT and (n.startswith("d" * 120) or not n.isascii()):
                    continue
                ti = tarfile.TarInfo(n.rstrip("/"))
                if n.endswith("/"):
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                elif n == "link.jpg":
                    ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    tf.addfile(ti)
                else:
                    ti.size = 700
                    tf.addfile(ti, io.BytesIO(bytes(700)))
        c = count_local_tar(str(path))
        with open(path, "rb") as f:
            assert c.samples == count_tar_samples(f) and c.how == "headers", (fmt, c)
        gz = tmp_path / f"t{fmt}.tar.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        assert count_local_tar(str(gz)).samples == c.samples and count_local_tar(str(gz)).how == "stream"
