"""Evaluation on the cluster's workers (pipeline.evaluate_ray): images/s per worker and the driver's
peak memory, against the single-process evaluator (which loads the model in the driver).

    python benchmarks/eval_cluster.py                                   # coatnet_0 @ 224, 2 CPU workers
    python benchmarks/eval_cluster.py --variant coatnet_3 --img-size 384 --workers 8 --gpu --precision bf16

Each mode runs in a fresh process (so ru_maxrss is that mode's own peak): ``prepare`` writes demo
shards and the model's fp32 weights (random init: the speed does not depend on them) once into
--work; ``cluster`` scores them with ``evaluate_on_cluster`` (the workers read the weights folder;
the driver holds no model) and ``local`` with ``evaluate_model`` in the driver. Prints a table:
images/s per worker (scoring time of its parts: read + decode + forward), end-to-end images/s
(actor start and model load included), driver peak RSS and its RSS after imports.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(a) -> None:
    import models
    from pipeline.data import ShardIndex, write_demo_shards
    from pipeline.spec import ModelSpec
    from pipeline.weights import write_weights

    write_demo_shards(os.path.join(a.work, "data"), num_train=0, num_val=a.images, image_size=a.img_size,
                      samples_per_shard=max(1, a.images // 16))
    idx = ShardIndex.load(os.path.join(a.work, "data", "val"))
    model = models.create_model(a.variant, num_classes=idx.num_classes, img_size=a.img_size)
    write_weights(os.path.join(a.work, "weights"), model.state_dict().items())
    spec = ModelSpec.for_data(model, a.variant, idx)
    with open(os.path.join(a.work, "spec.json"), "w") as f:
        json.dump(spec.to_dict(), f)


def run(a) -> dict:
    import torch

    from pipeline.evaluate import evaluate_model
    from pipeline.evaluate_ray import ModelRef, evaluate_on_cluster
    from pipeline.spec import ModelSpec

    with open(os.path.join(a.work, "spec.json")) as f:
        spec = ModelSpec.from_dict(json.load(f))
    val = os.path.join(a.work, "data", "val")
    base = _rss_mib()
    start = time.perf_counter()
    if a.mode == "cluster":
        stats: dict = {}
        r = evaluate_on_cluster(ModelRef.from_weights(os.path.join(a.work, "weights"), spec), val,
                                workers=a.workers, use_gpu=a.gpu, precision=a.precision,
                                batch_size=a.batch_size, per_sample=True, stats=stats)
        per_pid: dict[int, list[float]] = {}
        for p in stats["parts"]:
            per_pid.setdefault(p["pid"], [0.0, 0.0])
            per_pid[p["pid"]][0] += p["keys"]
            per_pid[p["pid"]][1] += p["seconds"]
        rates = [n / s for n, s in per_pid.values() if s > 0]
    else:
        from pipeline.weights import load_weights

        model = spec.build()
        model.load_state_dict(load_weights(os.path.join(a.work, "weights")))
        torch.set_num_threads(a.threads or torch.get_num_threads())
        t0 = time.perf_counter()
        r = evaluate_model(model, spec, val, batch_size=a.batch_size, per_sample=True, precision=a.precision)
        rates = [r["num_samples"] / (time.perf_counter() - t0)]
    wall = time.perf_counter() - start
    return {"mode": a.mode, "workers": a.workers if a.mode == "cluster" else 1, "images": r["num_samples"],
            "per_worker": rates, "end_to_end": r["num_samples"] / wall, "rss_base_mib": base,
            "rss_peak_mib": _rss_mib(), "top1": r["top1"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["all", "prepare", "cluster", "local"], default="all")
    ap.add_argument("--variant", default="coatnet_0")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the local mode")
    ap.add_argument("--work", default=None, help="folder for shards and weights (default: a temp folder)")
    a = ap.parse_args(argv)
    if a.mode == "prepare":
        prepare(a)
        return 0
    if a.mode in ("cluster", "local"):
        print(json.dumps(run(a)))
        return 0
    import shutil
    import tempfile

    own = a.work is None
    a.work = a.work or tempfile.mkdtemp(prefix="coatnet-evalbench-")
    try:
        args = [sys.executable, os.path.abspath(__file__), "--variant", a.variant, "--img-size", str(a.img_size),
                "--images", str(a.images), "--workers", str(a.workers), "--precision", a.precision,
                "--batch-size", str(a.batch_size), "--work", a.work] + (["--gpu"] if a.gpu else [])
        subprocess.run(args + ["--mode", "prepare"], check=True, cwd=ROOT)
        rows = []
        for mode in ("local", "cluster"):
            out = subprocess.run(args + ["--mode", mode], check=True, cwd=ROOT, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{a.variant} @ {a.img_size}px, {a.images} images, batch {a.batch_size}, {a.precision}, "
              f"{'GPU' if a.gpu else 'CPU'}; load average {os.getloadavg()[0]:.2f}")
        print(f"{'mode':<9}{'workers':>8}{'img/s per worker':>24}{'img/s end to end':>18}"
              f"{'driver RSS after imports':>26}{'driver peak RSS':>17}{'top1':>8}")
        for r in rows:
            per = ", ".join(f"{x:.1f}" for x in r["per_worker"])
            print(f"{r['mode']:<9}{r['workers']:>8}{per:>24}{r['end_to_end']:>18.1f}"
                  f"{r['rss_base_mib']:>22.0f} MiB{r['rss_peak_mib']:>13.0f} MiB{r['top1']:>8.4f}")
        if a.precision == "fp32":
            assert rows[0]["top1"] == rows[1]["top1"], "the two evaluators disagree"
    finally:
        if own:
            shutil.rmtree(a.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
