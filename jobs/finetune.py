"""Fine-tune a pretrained CoAtNet at a new resolution / label set (Ray Train + DeepSpeed ZeRO-3).

    python jobs/finetune.py --from <pretrain MLflow run id>                  # demo recipe, 64 px
    python jobs/finetune.py --from models:/coatnet-demo@champion             # or models:/NAME/3
    python jobs/finetune.py --from runs/demo  train.steps=40                 # Ray run / checkpoint folder
    python jobs/finetune.py --from s3://bucket/ray-runs/c3 --config configs/finetune_coatnet_3_imagenet1k_384.yaml
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/finetune.py --from <run id> --config configs/<finetune recipe>.yaml

ZeRO-3 shards are consolidated to fp32, relative-position tables resized (bilinear) to
model.img_size, the head replaced when the class count differs; the MLflow run records the source
(coatnet.source, coatnet.parent_run, coatnet.source_checkpoint). The same storage.name resumes.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True,
                   help="pretraining MLflow run id, models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint folder (local or s3://)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "finetune_demo.yaml"))
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args(argv)

    from pipeline.console import run_job, say

    def body() -> int:
        from pipeline.config import load_config
        from pipeline.finetune import run_finetune

        cfg = load_config(a.config, a.overrides)
        summary, source = run_finetune(cfg, a.source)
        say("\n== fine-tuning finished ==")
        say(f"source         {source.ref} ({source.kind}, {source.variant} @ {source.img_size}px, "
            f"parent run {source.parent_run_id})")
        for line in summary.lines():
            say(line)
        return 0

    return run_job("finetune", body)


if __name__ == "__main__":
    sys.exit(main())
