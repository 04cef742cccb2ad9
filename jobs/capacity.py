"""Capacity planner: compute, time, ZeRO-3 memory per GPU and data rate for a CoAtNet pretraining run.

    python jobs/capacity.py --variant coatnet_3 --img-size 224 --dataset jft-300m --epochs 14 \
        --global-batch 4096 --gpu H100-SXM --num-gpus 64
    python jobs/capacity.py --config configs/coatnet_3_jft.yaml --gpu A100-40GB   # a recipe's settings
    python jobs/capacity.py --paper        # our FLOP count vs the paper's TPUv3-core-days

Exit status: 0 when the run fits in GPU memory at --num-gpus, 1 when it does not, 2 on bad input.

FLOPs come from the model's own counter (models.count_flops, multiply-accumulates; FLOPs = 2 x MACs,
training = 3 x forward). The MFU is measured where benchmarks/RESULTS.md has a figure for the variant,
resolution and GPU (pipeline.capacity.MEASURED_MFU), else modelled from the model's per-op-type
roofline (pipeline.roofline); the output says which (--roofline prints the breakdown). Activation memory is measured (saved-tensor hooks, forward + backward on
the meta device). The logic lives in pipeline/capacity.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline import capacity as planner  # noqa: E402


def _count(text: str) -> int:
    if text in planner.DATASETS:
        return planner.DATASETS[text]
    try:
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a number of images (e.g. 1.28e6) or one of {', '.join(planner.DATASETS)}")


def _from_recipe(path: str):
    """Inputs and ZeRO settings from a training recipe: the typed config (pipeline.config) and the
    DeepSpeed config the trainer generates from it (pipeline.engine.deepspeed_config)."""
    from pipeline.config import load_config
    from pipeline.engine import deepspeed_config

    cfg = load_config(path)
    fields = {"variant": cfg.model.variant, "img_size": cfg.model.img_size,
              "global_batch": cfg.train.global_batch, "num_gpus": cfg.scaling.num_workers,
              "offload": cfg.deepspeed.offload, "checkpointing": cfg.model.grad_checkpointing,
              "architecture": tuple(sorted(cfg.model.architecture().items()))}
    if cfg.train.epochs:
        fields["epochs"] = cfg.train.epochs
    zero = planner.ZeroSettings.from_deepspeed_config(deepspeed_config(cfg))
    return fields, zero


def main(argv=None) -> int:
    d = planner.PlanInputs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None,
                    help="a training recipe (configs/*.yaml): variant, resolution, batch, epochs, GPU "
                         "count, offload and checkpointing from it, ZeRO buckets from the DeepSpeed "
                         "config the trainer generates; flags given here override it")
    ap.add_argument("--variant", default=None, help=f"model name for models.create_model ({d.variant})")
    ap.add_argument("--img-size", type=int, default=None, help=f"({d.img_size})")
    ap.add_argument("--preset", choices=["timm", "paper"], default=None,
                    help="the network's form (model.preset; default: the recipe's, else timm)")
    ap.add_argument("--dataset", type=_count, default=d.dataset_size,
                    help=f"images per epoch, or one of {', '.join(planner.DATASETS)} (default jft-300m)")
    ap.add_argument("--epochs", type=float, default=None, help=f"({d.epochs:g})")
    ap.add_argument("--global-batch", type=int, default=None, help=f"({d.global_batch})")
    ap.add_argument("--gpu", default=d.gpu, choices=list(planner.GPUS))
    ap.add_argument("--num-gpus", type=int, default=None, help=f"({d.num_gpus})")
    ap.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    ap.add_argument("--mfu", type=float, default=None,
                    help="model FLOPs utilisation of the datasheet bf16 peak (default: the measured "
                         "figure for this variant, resolution and GPU, else modelled from the roofline)")
    ap.add_argument("--roofline", action="store_true",
                    help="also print the roofline of one train step by op type and stage")
    ap.add_argument("--offload", choices=["none", "cpu", "nvme"], default=None,
                    help="ZeRO-3 offload of optimizer states + params (infra/deepspeed/*.json)")
    ap.add_argument("--checkpointing", action="store_true", default=None,
                    help="activation checkpointing")
    ap.add_argument("--bytes-per-image", type=float, default=d.bytes_per_image,
                    help="average encoded bytes per sample in the shards (default 110e3)")
    ap.add_argument("--decode-rate", type=float, default=d.decode_images_per_core_s,
                    help="images/s one CPU core decodes + augments (default 300, measured here)")
    ap.add_argument("--min-micro-batch", type=int, default=d.min_micro_batch)
    ap.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price, for a cost line")
    ap.add_argument("--deepspeed-config", default=None,
                    help="read ZeRO-3 buckets/thresholds from this JSON (default: the recipe's, else "
                         "the values of infra/deepspeed/zero3_bf16.json)")
    ap.add_argument("--paper", action="store_true", help="print the comparison with the paper's compute")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)

    if args.paper:
        rows = planner.paper_check()
        if args.json:
            print(json.dumps([r.__dict__ for r in rows], indent=2))
        else:
            print(planner.format_paper_check(rows))
        return 0

    fields = {k: getattr(d, k) for k in ("variant", "img_size", "epochs", "global_batch",
                                          "num_gpus", "offload", "checkpointing", "architecture")}
    zero = None
    try:
        if args.config:
            recipe, zero = _from_recipe(args.config)
            fields.update(recipe)
        for k in fields:
            if getattr(args, k, None) is not None:
                fields[k] = getattr(args, k)
        if args.preset is not None:
            arch = {**dict(fields["architecture"]), "preset": args.preset}
            fields["architecture"] = tuple(sorted((k, v) for k, v in arch.items() if (k, v) != ("preset", "timm")))
        inp = planner.PlanInputs(
            **fields, dataset_size=args.dataset, gpu=args.gpu, gpus_per_node=args.gpus_per_node,
            mfu=args.mfu, bytes_per_image=args.bytes_per_image, min_micro_batch=args.min_micro_batch,
            usd_per_gpu_hour=args.usd_per_gpu_hour, decode_images_per_core_s=args.decode_rate)
        if args.deepspeed_config:
            with open(args.deepspeed_config) as f:
                zero = planner.ZeroSettings.from_deepspeed_config(json.load(f), offload=inp.offload)
        p = planner.plan(inp, zero)
    except ValueError as e:  # bad recipe, unknown GPU, bad MFU
        print(f"plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"inputs": inp.__dict__, "facts": p.facts.__dict__, "mfu": p.mfu.__dict__,
               "memory": {**p.memory.__dict__, "total": p.memory.total},
               **{k: getattr(p, k) for k in ("total_flops", "seconds", "gpu_hours", "micro_batch",
                                             "grad_accum", "fits", "min_gpus", "images_per_s",
                                             "mb_per_s", "decode_cores", "cost_usd")}}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(planner.format_plan(p))
        if args.roofline:
            print()
            print(planner.format_roofline(p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
