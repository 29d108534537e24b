"""How long counting foreign shards takes without a manifest: a synthetic ImageNet-shaped set.

    python -m data_pipeline.bench_index --shards 1024 --samples 1251 --image-bytes 110000 --dir /tmp/x

writes ``--shards`` tars of ``--samples`` samples each (``KEY.cls`` then ``KEY.jpg`` of
``--image-bytes``: ImageNet's train set in timm's 1,024 shards averages 1,251 samples of ~110 KB),
then times the header-only count (``index.scan_counts``, what ``resolve_shards`` does for a folder of
tars without an index) and reports tars/s, samples/s and the bytes read against the set's size.
The image data is a hole in a sparse file (the count never reads it; disk use is one 4 KiB block
per sample instead of 110 KB), so the tars are written fast and the figure is the cost of the
headers alone, from the page cache when the set was just written (a cold network file system adds
one round trip per header read).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

from .index import scan_counts


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o444
    return ti.tobuf(tarfile.USTAR_FORMAT)


def write_sparse_tar(path: Path, shard: int, samples: int, image_bytes: int) -> None:
    pad = -image_bytes % 512
    with open(path, "wb") as f:
        for i in range(samples):
            key = f"n{shard:05d}_{i:06d}"
            label = str(i % 1000).encode()
            f.write(_header(f"{key}.cls", len(label)) + label + bytes(512 - len(label)))
            f.write(_header(f"{key}.jpg", image_bytes))
            f.seek(image_bytes + pad, os.SEEK_CUR)  # a hole: never written, never read
        f.write(bytes(1024))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=1024)
    p.add_argument("--samples", type=int, default=1251)
    p.add_argument("--image-bytes", type=int, default=110_000)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", required=True, help="a new folder for the synthetic set (removed afterwards)")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=False)
    try:
        t0 = time.perf_counter()
        urls = []
        for s in range(a.shards):
            urls.append(str(d / f"imagenet1k-train-{s:04d}.tar"))
            write_sparse_tar(Path(urls[-1]), s, a.samples, a.image_bytes)
        made = time.perf_counter() - t0
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            counts = scan_counts(urls, workers=a.workers)
            times.append(time.perf_counter() - t0)
        assert all(c.samples == a.samples and c.how == "headers" for c in counts)
        secs = sorted(times)[len(times) // 2]
        size = sum(c.size for c in counts)
        read = sum(c.bytes_read for c in counts)
        out = {"shards": a.shards, "samples": a.shards * a.samples, "seconds": round(secs, 3),
               "tars_per_s": round(a.shards / secs, 1), "samples_per_s": round(a.shards * a.samples / secs),
               "bytes_read": read, "set_bytes": size, "read_share": read / size,
               "workers": a.workers, "write_seconds": round(made, 1), "repeats": times}
        print(json.dumps(out))
        return out
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
