#!/usr/bin/env python
"""One RelativeAttention layer with bf16 WEIGHTS (as under DeepSpeed bf16: the bias table is a bf16
parameter), forward + backward per backend: time, TFLOP/s, and the output / input / qkv-weight /
bias-table gradients against an fp32 `math` reference. The question it answers on a GPU: does
compiled FlexAttention (the `auto` choice inside torch.compile) train the bf16 table, and is it
faster than SDPA with a dense bias (whose N x N bias gradient is materialised)?

Backends: math, sdpa (eager: `auto` outside compile), flex (torch.compile of the layer: `auto`
inside compile), sdpa+compile. Shapes at 224 px: coatnet_0 S3 (14x14, 384) and S4 (7x7, 768),
coatnet_3 S3 (14x14, 768). On CPU one tiny shape and no flex (PyTorch has no CPU flex backward).

    python benchmarks/attn_layer.py --device cuda --shapes c0_S3,c3_S3 --backends math,sdpa,flex,sdpa+compile
    python benchmarks/attn_layer.py --device cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from models.coatnet import RelativeAttention  # noqa: E402
from models.relpos import relative_position_index  # noqa: E402

SHAPES = {"c0_S3": (384, (14, 14), 256), "c0_S4": (768, (7, 7), 256), "c3_S3": (768, (14, 14), 128),
          "tiny": (64, (4, 3), 2)}


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def grads(fn, mod, x, idx, dout):
    x = x.detach().requires_grad_()
    mod.zero_grad(set_to_none=True)
    out = fn(x, idx)
    out.backward(dout)
    return tuple(None if t is None else t.detach().clone()
                 for t in (out, x.grad, mod.qkv.weight.grad, mod.relative_position_bias_table.grad))


def timed_ms(fn, dev, n: int = 10, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="c0_S3,c0_S4,c3_S3")
    p.add_argument("--backends", default="math,sdpa,flex,sdpa+compile")
    args = p.parse_args()
    dev = torch.device(args.device)
    shapes = ["tiny"] if dev.type == "cpu" else args.shapes.split(",")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}))
    rows, failed = [], 0
    for shape in shapes:
        dim, grid, batch = SHAPES[shape]
        dim_head = 16 if shape == "tiny" else 32
        torch.manual_seed(0)
        ref = RelativeAttention(dim, dim, dim_head, grid, attn_backend="math").to(dev)
        with torch.no_grad():
            ref.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
        idx = relative_position_index(grid, device=dev)
        n = grid[0] * grid[1]
        x, dout = torch.randn(batch, n, dim, device=dev), torch.randn(batch, n, dim, device=dev)
        want = grads(ref, ref, x, idx, dout)
        flops = batch * (2 * n * dim * 3 * dim + 2 * n * dim * dim + 4 * n * n * dim) * 3
        for spec in args.backends.split(","):
            backend, _, comp = spec.partition("+")
            if backend == "flex" and dev.type == "cpu":
                rows.append((shape, spec, "skipped: no flex backward on CPU"))
                continue
            mod = RelativeAttention(dim, dim, dim_head, grid, attn_backend=backend).to(dev)
            mod.load_state_dict(ref.state_dict())
            mod = mod.to(torch.bfloat16)
            fn = torch.compile(mod, dynamic=False) if (backend == "flex" or comp) else mod
            xb, db = x.bfloat16(), dout.bfloat16()
            try:
                t0 = time.perf_counter()
                got = grads(fn, mod, xb, idx, db)
                first_s = time.perf_counter() - t0
                ms = timed_ms(lambda: grads(fn, mod, xb, idx, db), dev)
                errs = {k: None if g is None else round(rel(g, w), 5)
                        for k, g, w in zip(("out", "dx", "dqkv_w", "dtable"), got, want)}
                row = dict(shape=shape, backend=spec, batch=batch, tokens=n, first_call_s=round(first_s, 1),
                           ms_fwd_bwd=round(ms, 3), tflops=round(flops / ms / 1e9, 1), rel_err_vs_fp32_math=errs,
                           table_grad_dtype=str(got[3].dtype) if got[3] is not None else None)
                print(json.dumps(row), flush=True)
                rows.append((shape, spec, f"{ms:.3f} | {flops / ms / 1e9:.1f} | " +
                             " | ".join("-" if v is None else f"{v:.1e}" for v in errs.values())))
            except Exception as exc:  # noqa: BLE001 - report every backend, then fail
                failed += 1
                rows.append((shape, spec, f"FAILED: {type(exc).__name__}: {str(exc)[:100]}"))
                traceback.print_exc(limit=4)
            torch._dynamo.reset()
    print("| shape | backend | ms fwd+bwd | TFLOP/s | out | dx | dqkv_w | dtable (rel. err. vs fp32 math) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, spec, rest in rows:
        print(f"| {shape} | {spec} | {rest} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
