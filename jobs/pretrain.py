"""Pretrain a CoAtNet with Ray Train + DeepSpeed ZeRO-3, tracked in MLflow.

    python jobs/pretrain.py                                   # embedded demo (local Ray, 2 CPU workers)
    python jobs/pretrain.py --config configs/coatnet_3_imagenet1k.yaml train.lr=5e-4 storage.name=c3
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/pretrain.py --config configs/<recipe>.yaml

Overrides are dotted ``section.key=value`` (YAML values). The same ``storage.storage_path`` +
``storage.name`` resumes from the latest checkpoint and continues the same MLflow run.
All logic lives in ``pipeline`` (config, launch, engine, train, checkpoint, tracking). The
terminal shows the job's own lines; Ray's and DeepSpeed's output goes to the log file it names.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "torch_extensions"))

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="recipe YAML (default: configs/demo.yaml)")
    p.add_argument("--check", action="store_true", help="validate config, data and storage; start nothing")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)

    from pipeline.console import run_job, say

    def body() -> int:
        from pipeline import launch
        from pipeline.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.check:
            cfg, task = launch.prepare(cfg)
            say(f"config OK: {cfg.model.variant} @ {cfg.model.img_size}px, {task.total_steps} steps")
            return 0
        summary = launch.run(cfg)
        say("\n== pretraining finished ==")
        for line in summary.lines():
            say(line)
        return 0

    return run_job("pretrain", body)


if __name__ == "__main__":
    sys.exit(main())
