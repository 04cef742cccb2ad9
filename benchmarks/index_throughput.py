#!/usr/bin/env python
"""How fast `jobs/index_shards.py` indexes existing shards: shards (and MB) per second per core.

Shards written by webdataset's own ShardWriter from real photographs (the crops of
benchmarks/data_throughput.py: ~500x375 JPEG q90, ~55 KB, nothing downloaded), string keys, labels
in `cls` and in a `json` field. Each row indexes the same shards from scratch (its own DEST), in this
process (`--workers 1`: one core), and reports CPU seconds, so that the figure is per core whatever
else runs; wall time is printed too. Reading is the whole cost: sha256 over every byte and
webdataset's tar parsing (the images are not decoded). On object storage the per-core rate is the
same; the wall rate then also depends on the bandwidth per task (`--ray`: one task per
`--shards-per-task` shards, two per cluster CPU in flight).

    python benchmarks/index_throughput.py [--shards 32] [--samples-per-shard 100]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import webdataset as wds  # noqa: E402

from data_throughput import load_note, machine, write_photo_folder  # noqa: E402
from pipeline.data.foreign import IndexOptions, index_existing_shards  # noqa: E402


def write_foreign_shards(folder: Path, photos: Path, num_shards: int, per_shard: int) -> float:
    """``num_shards`` ShardWriter shards; returns the mean shard size in MB."""
    files = sorted(photos.rglob("*.jpg"))
    pattern = str(folder / "train-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as writer:
        for i in range(num_shards * per_shard):
            f = files[i % len(files)]
            label = int(f.parent.name.removeprefix("class"))
            writer.write({"__key__": f"photo-{i:08d}_{f.stem}", "jpg": f.read_bytes(), "cls": str(label),
                          "json": json.dumps({"label": f"class{label}", "width": 500})})
    sizes = [p.stat().st_size for p in folder.glob("*.tar")]
    return sum(sizes) / len(sizes) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--photos", type=int, default=256, help="distinct photographs (repeated to fill the shards)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        write_photo_folder(tmp / "photos", args.photos)
        (tmp / "shards").mkdir()
        mb = write_foreign_shards(tmp / "shards", tmp / "photos", args.shards, args.samples_per_shard)
        pattern = str(tmp / "shards" / f"train-{{000000..{args.shards - 1:06d}}}.tar")
        print(f"{machine()}\n{args.shards} shards of {args.samples_per_shard} photographs, {mb:.1f} MB each\n")
        print("| label key | shards/s per core | MB/s per core | samples/s per core | wall s | re-run wall s |")
        print("|---|---|---|---|---|---|")
        for key in ("cls", "json:label"):
            dest = tmp / f"ds-{key.replace(':', '-')}"
            cpu0, wall0 = time.process_time(), time.perf_counter()
            summary = index_existing_shards(pattern, str(dest), "train", IndexOptions(label_key=key, progress=False))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            wall1 = time.perf_counter()
            index_existing_shards(pattern, str(dest), "train", IndexOptions(label_key=key, progress=False))
            rerun = time.perf_counter() - wall1
            print(f"| {key} | {summary.num_shards / cpu:.1f} | {summary.bytes_read / 1e6 / cpu:.0f} | "
                  f"{summary.num_samples / cpu:.0f} | {wall:.2f} | {rerun:.2f} |")
        print(f"\n{load_note()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
