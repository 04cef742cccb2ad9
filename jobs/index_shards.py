#!/usr/bin/env python
"""Index existing WebDataset shards in place, so that training reads them as they are.

    python jobs/index_shards.py SHARDS DEST --split SPLIT [--label-key KEY] [--classes FILE] [--ray]

SHARDS: a WebDataset brace pattern (s3://bucket/in21k/train-{000000..012345}.tar), a glob, a text
file listing shard URLs (one a line), or a folder/prefix (every .tar/.tgz under it). Shards written
by webdataset's ShardWriter, img2dataset or any tool: keys may be any string, images any of
jpg/jpeg/png/webp/bmp/gif/tif(f).

Every shard is read once (streamed: sample count, size, sha256, the labels seen) and never
modified; DEST/SPLIT/index.parquet is written pointing at the shards where they are (absolute
URLs when DEST is elsewhere) and records how labels are read. Train with data.root=DEST.

Labels (--label-key): `cls` (default), any entry holding an integer or a class name (`txt`,
`label`), or `json:FIELD` (a field of the sample's .json entry: an integer, a class name, or a
list of them for multi-label; dots for nesting, `json:meta.label`). Class names come from
--classes (one a line; labels index into it or name its lines), else are discovered: integers
0..max, or the sorted names seen (as make_shards does).

Unreadable shards and samples without an image or label are left out and counted, never fatal.
A re-run reads only shards it has no record of (records in DEST/SPLIT/_progress/). With --ray,
one Ray task per --shards-per-task shards: on the cluster at RAY_ADDRESS, else a private local Ray.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="brace pattern, glob, shard-list file, or folder/prefix of .tar shards")
    p.add_argument("dest", help="dataset root (local path or fsspec URL): the index goes to DEST/SPLIT/")
    p.add_argument("--split", required=True, help="split name (train, val, ...)")
    p.add_argument("--label-key", default="cls", help="cls (default), another entry (txt), or json:FIELD")
    p.add_argument("--classes", default=None, help="text file with one class name per line")
    p.add_argument("--ray", action="store_true",
                   help="one Ray task per group of shards (the cluster at RAY_ADDRESS, else a local Ray)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="local processes (with --ray and no RAY_ADDRESS: the local Ray's CPUs)")
    p.add_argument("--shards-per-task", type=int, default=32, help="shards read by one task")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.data.foreign import IndexOptions, index_existing_shards  # after --help: torch is slow to import
    from pipeline.errors import PipelineError

    try:
        classes = None
        if args.classes:
            from pipeline.data.storage import read_bytes

            try:
                text = read_bytes(args.classes).decode()
            except FileNotFoundError:
                raise PipelineError(f"classes file {args.classes} does not exist") from None
            classes = tuple(line.strip() for line in text.splitlines() if line.strip())
        options = IndexOptions(label_key=args.label_key, class_names=classes,
                               executor="ray" if args.ray else "local", num_workers=args.workers,
                               shards_per_task=args.shards_per_task, progress=not args.no_progress)
        start = time.perf_counter()
        summary = index_existing_shards(args.shards, args.dest, args.split, options)
    except (PipelineError, ValueError, OSError) as exc:
        print(f"index_shards: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(summary.format())
    elapsed = time.perf_counter() - start
    if summary.shards_indexed:
        print(f"read {summary.shards_indexed} shards ({summary.bytes_read / 1e6:.1f} MB) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
