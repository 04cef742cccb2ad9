#!/usr/bin/env python
"""Batch diversity on a class-sorted source, and what reading several shards at once costs:
distinct classes per batch, loader memory per worker and images per second per core, for
``StreamingLoader(interleave=...)`` from 1 (the loader before: one shard at a time) up.

Source, at the ratios of a 10^9-sample run (issue 20): a Parquet manifest sorted by class (as a
folder listing is), 10 classes, written by ``write_shards`` with 50 samples per shard and 2 shards
per part (a part is permuted within itself only, so every shard holds one class); the loader's
shuffle buffer is one shard's worth (50 samples) per worker, batches of 64. Images: the real
photographs of benchmarks/data_throughput.py (~500x375 JPEG q90). A batch of 64 random draws holds
10 x (1 - 0.9^64) = 9.99 classes on average: the "of random" column divides by that.

Speed and memory: one DataLoader worker, training transforms at --img-size with uint8 output and
RandAugment on the device (the fastest configuration of data_throughput.py), checksums verified.
Per core = images / (worker + main process CPU seconds); memory = the worker's peak resident set
(polled each batch; it includes the ~100+ MB every forked torch worker has), and the temporary-file
bytes its spooled shards took (lanes spool beyond 64 MB / lanes each to a temporary file).

    python benchmarks/loader_shuffle.py [--rows 4000] [--interleave 1 8 16 32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from data_throughput import children_cpu_s, load_note, machine, write_photo_folder  # noqa: E402
from pipeline.data import AugmentConfig, ShardIndex, ShardOptions, StreamingLoader, write_shards  # noqa: E402

RANDOM = 10 * (1 - 0.9 ** 64)


def class_sorted_shards(tmp: Path, rows: int, photos: int) -> ShardIndex:
    write_photo_folder(tmp / "photos", photos)
    files = sorted((tmp / "photos").rglob("*.jpg"))
    paths = [str(files[i % len(files)]) for i in range(rows)]
    labels = [f"c{i * 10 // rows}" for i in range(rows)]           # sorted by class
    pq.write_table(pa.table({"image": paths, "label": labels}), tmp / "manifest.parquet")
    write_shards(str(tmp / "manifest.parquet"), str(tmp / "ds"),
                 options=ShardOptions(samples_per_shard=50, shards_per_part=2, num_workers=2, progress=False))
    return ShardIndex.load(str(tmp / "ds" / "train"))


def spooled_bytes(pid: int) -> int:
    """Bytes in the unlinked temporary files a process holds open (verified shards spooled to disk)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(tempfile.gettempdir()) and target.endswith("(deleted)"):
                total += os.stat(fd).st_size
        except OSError:
            pass
    return total


def run(index: ShardIndex, interleave: int, img_size: int) -> dict[str, float]:
    loader = StreamingLoader(index, batch_size=64, img_size=img_size, num_workers=1, shuffle_buffer=50,
                             interleave=interleave, output="uint8",
                             augment=AugmentConfig(randaug_device=True))
    me = psutil.Process()
    peak, spooled, distinct, samples = 0, 0, [], 0
    child0, main0, wall0 = children_cpu_s(), time.process_time(), time.perf_counter()
    for batch in loader:
        samples += len(batch)
        if len(batch) == 64:
            distinct.append(len(set(batch.labels.tolist())))
        for child in me.children():
            try:
                peak = max(peak, child.memory_info().rss)
                spooled = max(spooled, spooled_bytes(child.pid))
            except (psutil.Error, OSError):
                pass
    cpu = children_cpu_s() - child0 + time.process_time() - main0
    return {"distinct": float(np.mean(distinct)), "per_core": samples / cpu,
            "wall": samples / (time.perf_counter() - wall0), "rss_mb": peak / 2**20, "spool_mb": spooled / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--photos", type=int, default=512)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--interleave", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--rounds", type=int, default=2, help="passes per setting (best per-core rate kept)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-shuffle-"))
    try:
        index = class_sorted_shards(tmp, args.rows, args.photos)
        print(f"{machine()}\n{index.num_samples} samples in {index.num_shards} class-sorted shards of 50, "
              f"buffer 50, batch 64, {args.img_size} px, 1 loader worker\n")
        print("| interleave (shards at once) | classes per batch | of random | img/s per core | wall img/s "
              "| worker peak RSS MB | spooled to temp files MB |")
        print("|---|---|---|---|---|---|---|")
        for lanes in args.interleave:
            results = [run(index, lanes, args.img_size) for _ in range(args.rounds)]
            r = max(results, key=lambda x: x["per_core"])
            print(f"| {lanes}{' (before)' if lanes == 1 else ''} | {r['distinct']:.2f} | {r['distinct'] / RANDOM:.0%} "
                  f"| {r['per_core']:.0f} | {r['wall']:.0f} | {max(x['rss_mb'] for x in results):.0f} "
                  f"| {max(x['spool_mb'] for x in results):.1f} |")
        print(f"\n{load_note()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
