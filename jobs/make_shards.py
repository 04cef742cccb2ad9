#!/usr/bin/env python
"""Write WebDataset shards + index.parquet (index.json too for small splits) from an ImageFolder, a CSV/Parquet manifest or `demo`.

    python jobs/make_shards.py SOURCE DEST [options]

SOURCE: a folder (one subfolder per class), a .csv/.parquet manifest (image column + `label` or
`labels` for multi-label), or the word `demo` (the generated 10-class dataset). DEST: a local path
or any fsspec URL (s3://bucket/prefix); shards go to DEST/<split>/. Credentials and endpoints come
from the standard places (AWS_* variables, profiles). A rerun skips shards already complete.

With --ray, every part (--shards-per-part consecutive shards) is a Ray task: on the cluster when
RAY_ADDRESS is set (`ray job submit -- python jobs/make_shards.py ... --ray`), else on a private
local Ray with --workers CPUs. A Parquet manifest is streamed (each task reads its own rows), so a
10^9-row manifest is never whole in memory; a killed run, re-run, writes only what is missing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder, .csv/.parquet manifest, or 'demo'")
    p.add_argument("dest", help="dataset root: local path or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--split", default=None, help="split name for all inputs (default: train)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the inputs as split 'val' (default: 0)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink images so the longer side is at most this (re-encodes as JPEG)")
    p.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--classes", default=None,
                   help="text file with one class name per line (manifest labels index into it)")
    p.add_argument("--shards-per-part", type=int, default=16,
                   help="shards per task; a Parquet manifest's rows are permuted within a part")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="writer processes (with --ray and no RAY_ADDRESS: the local Ray's CPUs)")
    p.add_argument("--ray", action="store_true",
                   help="one Ray task per part (the cluster at RAY_ADDRESS, else a local Ray)")
    p.add_argument("--seed", type=int, default=0, help="input shuffle and val split")
    p.add_argument("--no-progress", action="store_true")
    demo = p.add_argument_group("demo source")
    demo.add_argument("--num-train", type=int, default=2000)
    demo.add_argument("--num-val", type=int, default=500)
    demo.add_argument("--image-size", type=int, default=64)
    demo.add_argument("--multi-label", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.data import DataError, ShardOptions, write_demo_shards, write_shards  # after --help: torch is slow to import

    try:
        if args.source == "demo":
            summary = write_demo_shards(args.dest, num_train=args.num_train, num_val=args.num_val,
                                        image_size=args.image_size, multi_label=args.multi_label,
                                        samples_per_shard=args.samples_per_shard, seed=args.seed,
                                        num_workers=args.workers, progress=not args.no_progress,
                                        executor="ray" if args.ray else "local")
        else:
            classes = None
            if args.classes:
                with open(args.classes) as f:
                    classes = [line.strip() for line in f if line.strip()]
            options = ShardOptions(samples_per_shard=args.samples_per_shard, max_side=args.max_side,
                                   reencode=args.reencode, quality=args.quality,
                                   num_workers=args.workers, progress=not args.no_progress,
                                   seed=args.seed, shards_per_part=args.shards_per_part,
                                   executor="ray" if args.ray else "local")
            summary = write_shards(args.source, args.dest, split=args.split,
                                   val_fraction=args.val_fraction, options=options,
                                   class_names=classes)
    except (DataError, ValueError, OSError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
