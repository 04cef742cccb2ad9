"""Top-k labels for images with a registered CoAtNet (default: the `champion`).

    python jobs/predict.py img1.png img2.jpg
    python jobs/predict.py --model models:/coatnet-demo/3 --top-k 3 photos/ --output preds.jsonl
    python jobs/predict.py data/demo/val            # shards (a folder with index.parquet/index.json, or .tar files)

Inputs: image files, folders (searched recursively) or shards, local or fsspec URLs (s3://...).
Small inputs run in this process; shards or more than --ray-threshold images go through Ray Data
(read_images / read_webdataset, then map_batches with one model per actor). Writes one JSON line
per image (input, label, class_id, score, top_k_labels, top_k_scores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--model", default="models:/coatnet-demo@champion",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a folder")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ray", dest="use_ray", action="store_true", default=None, help="always use Ray Data")
    g.add_argument("--no-ray", dest="use_ray", action="store_false", help="never use Ray Data")
    p.add_argument("--ray-threshold", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=1, help="Ray Data actors")
    p.add_argument("--output", default="-", help="JSON lines file (default: stdout)")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)

    import mlflow

    from pipeline.errors import PipelineError
    from pipeline.predict import predict

    if a.tracking_uri:
        mlflow.set_tracking_uri(a.tracking_uri)
    try:
        rows = predict(a.model, a.inputs, top_k_=a.top_k, batch_size=a.batch_size, use_ray=a.use_ray,
                       ray_threshold=a.ray_threshold, concurrency=a.concurrency)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = sys.stdout if a.output == "-" else open(a.output, "w")
    try:
        for r in rows:
            out.write(json.dumps(r) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if a.output != "-":
        print(f"{len(rows)} predictions -> {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
