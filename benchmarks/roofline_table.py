#!/usr/bin/env python
"""MODELLED figures, no measurement: the roofline of one bf16 train step per variant, resolution and
GPU (pipeline.roofline, read from the model on the meta device; GPU rates from pipeline.capacity.GPUS
x the achievable fractions measured on an H200), and the MFU the capacity planner uses by default
(measured where pipeline.capacity.MEASURED_MFU has a figure, else ROOFLINE_EFFICIENCY x the ceiling).
Runs anywhere in seconds; --detail adds the per-op-type / per-stage tables.

    python benchmarks/roofline_table.py
    python benchmarks/roofline_table.py --variants coatnet_0,coatnet_3 --gpus H200 --sizes 224 --detail
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import capacity as planner  # noqa: E402
from pipeline.roofline import format_op_roofline, op_roofline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="coatnet_0,coatnet_1,coatnet_2,coatnet_3")
    p.add_argument("--sizes", default="224,384")
    p.add_argument("--gpus", default="H100-SXM,H200")
    p.add_argument("--batch", type=int, default=planner.ROOFLINE_BATCH)
    p.add_argument("--detail", action="store_true")
    args = p.parse_args()
    print(f"MODELLED (no measurement). Achievable rates = datasheet x {planner.MATMUL_EFFICIENCY:.3f} (matmul), "
          f"x {planner.BANDWIDTH_EFFICIENCY:.3f} (bandwidth); planner MFU = {planner.ROOFLINE_EFFICIENCY:.0%} of the "
          f"ceiling unless measured; MFU of the datasheet dense bf16 peak; batch {args.batch}")
    print("| variant | px | GPU | model GFLOP/img | min MB/img | ceiling img/s | ceiling MFU | planner MFU | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    details = []
    for v in args.variants.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            rl = op_roofline(v, size)
            for gname in args.gpus.split(","):
                g = planner.GPUS[gname]
                rates = (g.matmul_flops, g.fp32_flops, g.bandwidth)
                m = planner.default_mfu(v, size, gname, batch=args.batch)
                print(f"| {v} | {size} | {gname} | {rl.model_flops / 1e9:,.1f} | {rl.bytes_per_image / 1e6:,.0f} | "
                      f"{rl.images_per_s(args.batch, *rates):,.0f} | {rl.mfu(args.batch, *rates, peak=g.peak_bf16_flops):.1%} | "
                      f"{m.value:.1%} | {m.source} |")
                if args.detail:
                    details.append(format_op_roofline(rl, args.batch, *rates, g.peak_bf16_flops, gname))
    for d in details:
        print()
        print(d)


if __name__ == "__main__":
    main()
