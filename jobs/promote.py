"""Promote a registered CoAtNet version to the `champion` alias when it beats the current one.

    python jobs/promote.py --name coatnet-demo [--version 3] [--val data/demo/val] [--margin 0.005] [--significance 0.05]
    python jobs/promote.py --name coatnet-demo --version 4 --force --reason "hotfix: new label set"
    ray job submit --working-dir . -- python jobs/promote.py --name coatnet-3 --workers 16 --gpu --precision bf16

Both versions are evaluated on the same data (--val, default: the candidate's `data.val` tag), each
with its own preprocessing; scores and the decision are written as tags on the versions (nothing is
deleted), and re-running changes nothing. Prints the decision as JSON. Tracking server: the
MLFLOW_TRACKING_URI environment variable or --tracking-uri.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", default="coatnet-demo", help="registered model name")
    p.add_argument("--version", default=None, help="candidate version (default: the newest)")
    p.add_argument("--val", default=None, help="evaluation split (folder or URL holding index.parquet or index.json)")
    p.add_argument("--alias", default="champion")
    p.add_argument("--metric", default=None, choices=["top1", "top5", "precision_at_1", "recall_at_5", "mAP"],
                   help="default: top1 for single-label data, precision_at_1 for multi-label")
    p.add_argument("--margin", type=float, default=0.0, help="required improvement of the metric")
    p.add_argument("--significance", type=float, default=0.05,
                   help="level of McNemar's paired test the candidate must pass (0 or less: margin only)")
    p.add_argument("--force", action="store_true", help="move the alias even when not better (recorded)")
    p.add_argument("--reason", default="", help="why --force was used (recorded in tags)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="score on this many Ray workers (the cluster at RAY_ADDRESS, else a private local "
                        "Ray; the driver only merges); 0: in this process (default)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (with --workers)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the forward's precision: the model's training precision (bf16 for the paper recipes)")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)

    import mlflow

    from pipeline.errors import PipelineError
    from pipeline.promote import promote

    if a.tracking_uri:
        mlflow.set_tracking_uri(a.tracking_uri)
    try:
        d = promote(a.name, a.version, val=a.val, alias=a.alias, margin=a.margin, metric=a.metric,
                    significance=a.significance if a.significance > 0 else None,
                    force=a.force, reason=a.reason, batch_size=a.batch_size,
                    eval_options={"workers": a.workers, "use_gpu": a.gpu, "precision": a.precision})
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
