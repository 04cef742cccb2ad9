#!/usr/bin/env python
"""The shard writer's plan on a large Parquet manifest, by the real code: nothing holds it whole.

Writes a synthetic manifest of ``--rows`` rows (image URL + one of 21,843 class names, row groups
of ``--row-group`` rows), then measures, each in a FRESH process (time, and peak RSS above the
process's baseline with pyarrow and the writer imported):

- plan, classes given: ``scan_manifest`` (the footer) + every part of the train and val splits
  planned (``_plan_parts``), as ``write_shards`` does before any task runs;
- plan, classes found: the same with one streamed pass over the label column;
- one part task's rows: ``ManifestRows.read()`` for a part in the middle and for the last part
  of a row group (the worst case: the whole group decoded up to the part's end);
- the old path, for scale: the manifest read whole (``pyarrow.parquet.read_table``), at
  ``--whole-rows`` rows (default: min(rows, 10^7)), its memory per row and extrapolated to --rows.

    python benchmarks/manifest_scale.py [--rows 100000000] [--row-group 1000000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
NUM_CLASSES = 21_843


def write_manifest(path: str, rows: int, row_group: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = pa.array([f"n{i:08d}" for i in range(NUM_CLASSES)])
    rng = np.random.default_rng(0)
    schema = pa.schema([("image", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            ids = pa.array(np.arange(start, min(rows, start + row_group)))
            image = pc.binary_join_element_wise("s3://bucket/jft/", pc.cast(ids, pa.string()), ".jpg", "")
            label = pc.take(names, pa.array(rng.integers(0, NUM_CLASSES, len(ids))))
            writer.write_table(pa.table({"image": image, "label": label}, schema=schema),
                               row_group_size=row_group)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, path: str, rows: int, row_group: int, whole_rows: int) -> dict:
    import pyarrow.parquet as pq

    from pipeline.data.sources import ManifestRows, scan_manifest
    from pipeline.data.writer import ShardOptions, _Dataset, _plan_parts, _split_takes

    options = ShardOptions()
    part_rows = options.samples_per_shard * options.shards_per_part
    classes = [f"n{i:08d}" for i in range(NUM_CLASSES)]
    base = _peak_mb()
    t0 = time.perf_counter()
    out: dict = {}
    if kind.startswith("plan"):
        m = scan_manifest(path, classes if kind == "plan-classes-given" else None)
        sizes = [min(part_rows, m.num_rows - s) for s in range(0, m.num_rows, part_rows)]
        parts = 0
        for name, takes in _split_takes(sizes, 0.01, None).items():
            ds = _Dataset(f"/tmp/x/{name}", "single", len(m.class_names), options, None, None)
            parts += len(_plan_parts(ds, m.num_rows, lambda a, b: ManifestRows(m, a, b), takes, part_rows,
                                     options.seed))
        out.update(parts=parts, classes=len(m.class_names))
    elif kind.startswith("part"):
        m = scan_manifest(path, classes)
        group = (rows // row_group) // 2 * row_group                 # a row group in the middle
        start = group + (row_group - part_rows if kind == "part-last-in-group" else 0)
        out["rows_read"] = len(ManifestRows(m, start, start + part_rows).read())
    elif kind == "whole":
        pf = pq.ParquetFile(path)
        groups = list(range(max(1, whole_rows // row_group)))
        table = pf.read_row_groups(groups)
        out.update(rows_read=table.num_rows, arrow_mb=table.nbytes / 1e6)
    out.update(seconds=time.perf_counter() - t0, peak_mb=_peak_mb() - base)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000_000)
    p.add_argument("--row-group", type=int, default=1_000_000)
    p.add_argument("--whole-rows", type=int, default=None)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)   # child process
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    whole_rows = args.whole_rows or min(args.rows, 10_000_000)
    if args.measure:
        print(json.dumps(measure(args.measure, args.path, args.rows, args.row_group, whole_rows)))
        return

    tmp = tempfile.mkdtemp(prefix="manifest-scale-")
    try:
        path = os.path.join(tmp, "manifest.parquet")
        t0 = time.perf_counter()
        write_manifest(path, args.rows, args.row_group)
        size = os.path.getsize(path)
        print(f"manifest: {args.rows:,} rows, row groups of {args.row_group:,}, {size / 1e9:.2f} GB "
              f"(written in {time.perf_counter() - t0:.0f} s)\n")
        results = {}
        for kind in ("plan-classes-given", "plan-classes-found", "part-middle", "part-last-in-group", "whole"):
            cmd = [sys.executable, __file__, "--measure", kind, "--path", path, "--rows", str(args.rows),
                   "--row-group", str(args.row_group), "--whole-rows", str(whole_rows)]
            results[kind] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                                       .stdout.strip().splitlines()[-1])
        r = results
        per_row = r["whole"]["peak_mb"] / r["whole"]["rows_read"]
        print(f"{'step':<52} {'time':>9} {'peak RSS':>11}")
        print(f"{'plan, --classes given (footer + ' + format(r['plan-classes-given']['parts'], ',') + ' parts)':<52} "
              f"{r['plan-classes-given']['seconds']:>8.2f}s {r['plan-classes-given']['peak_mb']:>8.0f} MB")
        print(f"{'plan, classes found (label column streamed)':<52} "
              f"{r['plan-classes-found']['seconds']:>8.2f}s {r['plan-classes-found']['peak_mb']:>8.0f} MB")
        for kind, what in (("part-middle", "a part's rows (16,000; row group start)"),
                           ("part-last-in-group", "a part's rows (16,000; row group end)")):
            print(f"{what:<52} {r[kind]['seconds']:>8.2f}s {r[kind]['peak_mb']:>8.0f} MB")
        print(f"{'old path: read whole, ' + format(r['whole']['rows_read'], ',') + ' rows':<52} "
              f"{r['whole']['seconds']:>8.2f}s {r['whole']['peak_mb']:>8.0f} MB")
        print(f"{'old path extrapolated to ' + format(args.rows, ',') + ' rows':<52} "
              f"{r['whole']['seconds'] * args.rows / r['whole']['rows_read']:>8.0f}s "
              f"{per_row * args.rows:>8.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
