#!/usr/bin/env python
"""The shard index at scale: 10^6 shards / 10^9 samples, written and read by the real code.

Writes a synthetic split index (uneven shard sizes, random checksums; no tar files) through
``ShardIndex.save`` in the current format (index.parquet) and, with ``--json``, the legacy
index.json too; then, each in a FRESH process:

- bytes on storage;
- load time (``ShardIndex.load``) and the fingerprint's time (read from the file, or computed once);
- per-process memory: RSS after loading minus RSS before (torch and the loader already imported),
  and the same for the heap alone (RssAnon: RSS also counts the pages of Arrow's shared library
  code touched for the first time, ~25 MB shared by every process on the host);
- epoch plan time for one rank of ``--world-size`` with ``--workers`` loader streams
  (``plan_epoch``: shard permutation, cumulative counts, each stream's positions and shard rows);
- memory a forked loader worker adds: the private (unshared) memory of a forked child that takes
  its stream's plan, walks its shard runs and its shuffled position order, after ``gc.collect()``
  (which touches every tracked object: the copy-on-write a worker causes), minus that of a forked
  child that does nothing.

    python benchmarks/index_scale.py [--shards 1000000] [--samples 1000000000] [--json]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_index(root: str, num_shards: int, num_samples: int, with_json: bool) -> None:
    import numpy as np
    import pyarrow as pa

    from pipeline.data.index import JSON_INDEX_FILENAME, ShardIndex, ShardTable

    rng = np.random.default_rng(0)
    mean = num_samples // num_shards
    counts = rng.integers(int(mean * 0.9), int(mean * 1.1) + 1, size=num_shards)
    short = num_samples - int(counts.sum())                 # exactly num_samples in all
    counts += short // num_shards
    counts[:short % num_shards] += 1
    table = ShardTable(pa.array([f"shard-{i:07d}.tar" for i in range(num_shards)], pa.string()),
                       counts, counts * 110_000, rng.integers(0, 256, size=(num_shards, 32), dtype=np.uint8))
    index = ShardIndex(root=root, shards=table, class_names=tuple(f"class_{i}" for i in range(21_843)),
                       label_type="single", split="train", pre_shuffled=True,
                       meta={"source": "benchmarks/index_scale.py (synthetic)"})
    index.save(json_compat=False)
    if with_json:
        with open(os.path.join(root, JSON_INDEX_FILENAME), "w") as f:
            json.dump(index.to_json(), f)


def _private_kib() -> int:
    """Unshared memory of this process: Private_Clean + Private_Dirty (smaps_rollup)."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def _rss_kib(field: str = "VmRSS") -> int:
    """VmRSS (all resident pages, shared library code included) or RssAnon (the heap: what the
    process holds privately)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def _child(conn, plan, buffer_size: int, work: bool) -> None:
    from pipeline.data.plan import shuffled_positions

    if work:
        import numpy as np

        bounds = np.flatnonzero(np.diff(plan.position_shard, prepend=-1, append=-2))
        runs = [(plan.shards.url(int(plan.position_shard[a])), len(plan.shards)) for a in bounds[:-1]]
        order = list(itertools.islice(shuffled_positions(plan.num_positions, buffer_size,
                                                         np.random.default_rng(0)), 100_000))
        del runs, order
    gc.collect()
    conn.send(_private_kib())
    conn.close()


def _forked_private_kib(plan, buffer_size: int, work: bool) -> int:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, plan, buffer_size, work))
    proc.start()
    kib = parent.recv()
    proc.join()
    return kib


def measure(index_path: str, world_size: int, workers: int, batch_size: int) -> dict[str, float]:
    import pipeline.data.loader  # noqa: F401  torch, numpy, pyarrow imported before the baseline
    from pipeline.data.index import ShardIndex
    from pipeline.data.plan import Generation, PlanConfig, plan_epoch

    gc.collect()
    rss0, anon0 = _rss_kib(), _rss_kib("RssAnon")
    t0, c0 = time.perf_counter(), time.process_time()
    index = ShardIndex.load(index_path)
    t_load, c_load = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    index.fingerprint()
    t_fingerprint = time.perf_counter() - t0
    gc.collect()
    rss_index, anon_index = _rss_kib() - rss0, _rss_kib("RssAnon") - anon0
    cfg = PlanConfig(world_size=world_size, rank=world_size // 2, num_streams=workers,
                     batch_size=batch_size, seed=0, shuffle=True, drop_last=False,
                     samples_per_epoch=None)
    t0, c0 = time.perf_counter(), time.process_time()
    plans = plan_epoch(index, 3, cfg)
    t_plan, c_plan = time.perf_counter() - t0, time.process_time() - c0
    # An elastic resume: the epoch stopped half way at world_size x workers, continues at half the ranks.
    half = sum(len(p.batch_sizes) for p in plans) // workers // 2
    before = Generation(world_size, workers, batch_size, False, cfg.shuffle_buffer, (half,) * workers)
    resumed = replace(cfg, world_size=max(1, world_size // 2), rank=world_size // 4)
    t0 = time.perf_counter()
    plan_epoch(index, 3, resumed, [before])
    t_elastic = time.perf_counter() - t0
    idle = _forked_private_kib(plans[0], cfg.shuffle_buffer, work=False)
    busy = _forked_private_kib(plans[0], cfg.shuffle_buffer, work=True)
    return {"elastic_s": t_elastic, "cpu_s": c_load + c_plan, "load_s": t_load, "fingerprint_s": t_fingerprint, "plan_s": t_plan,
            "rss_mb": rss_index / 1024, "anon_mb": anon_index / 1024, "worker_mb": (busy - idle) / 1024,
            "worker_private_mb": busy / 1024, "shards": index.num_shards,
            "stream_shards": len(plans[0].shards), "stream_positions": plans[0].num_positions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=1_000_000_000)
    p.add_argument("--world-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="also measure the legacy index.json")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.world_size, args.workers, args.batch_size)))
        return 0

    root = tempfile.mkdtemp(prefix="index_scale_")
    try:
        t0 = time.perf_counter()
        write_index(root, args.shards, args.samples, args.json)
        print(f"wrote a {args.shards:,}-shard / {args.samples:,}-sample index in "
              f"{time.perf_counter() - t0:.1f} s under {root}", flush=True)
        rows = []
        for name in ["index.parquet"] + (["index.json"] if args.json else []):
            path = os.path.join(root, name)
            out = subprocess.run([sys.executable, __file__, "--measure", path,
                                  "--world-size", str(args.world_size), "--workers", str(args.workers),
                                  "--batch-size", str(args.batch_size)],
                                 capture_output=True, text=True, check=True)
            rows.append((name, os.path.getsize(path), json.loads(out.stdout.strip().splitlines()[-1])))
        print(f"\none rank of {args.world_size}, {args.workers} loader workers, batch {args.batch_size}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        print(f"| {'index':13} | {'on storage':>10} | {'load':>7} | {'fingerprint':>11} | "
              f"{'plan 1 rank':>11} | {'load + plan':>11} | {'RSS / process':>13} | {'heap / process':>14} | "
              f"{'added / worker':>14} |")
        print(f"|{'-' * 15}|{'-' * 12}|{'-' * 9}|{'-' * 13}|{'-' * 13}|{'-' * 13}|{'-' * 15}|{'-' * 16}|{'-' * 16}|")
        for name, size, m in rows:
            print(f"| {name:13} | {size / 1e6:7.1f} MB | {m['load_s']:5.2f} s | {m['fingerprint_s']:9.3f} s | "
                  f"{m['plan_s']:9.3f} s | {m['load_s'] + m['plan_s']:9.2f} s | {m['rss_mb']:10.1f} MB | "
                  f"{m['anon_mb']:11.1f} MB | "
                  f"{m['worker_mb']:11.1f} MB |")
        m = rows[0][2]
        print("\nCPU seconds of load + plan: " + ", ".join(f"{name} {m['cpu_s']:.2f} s" for name, _, m in rows)
              + " (wall-clock figures above inflate when other processes share the cores)")
        print(f"plan of one rank after an elastic resume ({args.world_size} -> {max(1, args.world_size // 2)} ranks, "
              f"half way through the epoch): {m['elastic_s']:.2f} s")
        print(f"a stream reads {m['stream_positions']:,} positions in {m['stream_shards']:,} shards; "
              f"a forked worker's private memory: {m['worker_private_mb']:.1f} MB in all")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
