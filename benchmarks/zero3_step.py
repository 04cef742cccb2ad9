#!/usr/bin/env python
"""The production training step (DeepSpeed ZeRO-3, bf16 weights, one rank) against a plain loop and
against its roofline: step time, images/s, MFU, % of the modelled roofline, graph breaks, host syncs
per step, bias-table gradients, and (CUDA, --profile) GPU time by kernel category.

Modes (comma list, run in order; one JSON line each, then a markdown table):
  plain       models.create_model + torch AdamW (fused on CUDA) + bf16 autocast, eager
  ds          pipeline.engine as pipeline.train builds it, model.compile=false
  ds_blocks   model.compile=true, compile_mode=blocks (the default on GPUs): blocks as ZeRO-3 leaf
              modules, each block's forward compiled (pipeline.engine.compile_engine)
  ds_engine   model.compile=true, compile_mode=engine: DeepSpeed's engine.compile()
MFU = 6 x models.count_flops MACs x images/s over the datasheet bf16 peak (989 TFLOP/s for H100 SXM and
H200; never FlopCounterMode: it counts depthwise weight gradients as dense convs). "% roofline" =
images/s over the ceiling of pipeline.roofline for this GPU (pipeline.capacity.GPUS) at this batch.

    python benchmarks/zero3_step.py --modes plain,ds,ds_blocks --variant coatnet_0 --batch 128 --profile
    python benchmarks/zero3_step.py --device cpu --variant coatnet_pico --size 64 --batch 4 \\
        --modes plain,ds,ds_blocks,ds_engine --backend aot_eager      # CPU: the same code, no timings to keep
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

for _k, _v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29517"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402

CATS = [("attention", r"fmha|attention|flex|sdpa|softmax"),
        ("depthwise", r"depthwise|dwconv|conv_depthwise|grouped|DepthwiseConv"),
        ("gemm/conv", r"gemm|gemv|cutlass|sm90|xmma|implicit|wgrad|dgrad|conv|cudnn|nvjet|Kernel2"),
        ("norm", r"batch_norm|layer_norm|bn_|welford|norm"),
        ("optimizer", r"adam|foreach|multi_tensor"),
        ("triton/fused", r"^triton_"),
        ("copy/cast", r"copy|cast|cat|to_copy|memcpy|Memcpy|fill|Memset"),
        ("elementwise/reduce", r"elementwise|vectorized|reduce|gelu|silu|sigmoid|mul|add")]


def say(**kw) -> None:
    print(json.dumps(kw, default=str), flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(step, dev, warmup: int, runs: int):
    for _ in range(warmup):
        step()
    sync(dev)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        step()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def host_syncs(step, dev) -> dict:
    """Synchronising CUDA calls one step makes: {file:line: count} (CUDA only)."""
    if dev.type != "cuda":
        return {}
    sync(dev)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(dev)
    c = Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in got if "synchroniz" in str(w.message))
    return dict(c.most_common(12))


def profile_step(step, dev) -> dict:
    """GPU time of one step by kernel category, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync(dev)
    cat, top, total = Counter(), [], 0.0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if not t or e.device_type.name != "CUDA":
            continue
        total += t
        name = next((c for c, rx in CATS if re.search(rx, e.key, re.I)), "other")
        cat[name] += t
        top.append((t, e.key[:90]))
    top.sort(reverse=True)
    return {"gpu_ms": round(total / 1e3, 2), "by_category_ms": {k: round(v / 1e3, 2) for k, v in cat.most_common()},
            "top_kernels_ms": [(round(t / 1e3, 2), n) for t, n in top[:15]]}


def gpu_spec(dev: torch.device):
    """pipeline.capacity's GPU entry for this device (H100 SXM / H200), else None."""
    if dev.type != "cuda":
        return None
    from pipeline.capacity import GPUS
    name = torch.cuda.get_device_name(dev)
    key = "H200" if "H200" in name else "H100-SXM" if "H100" in name else None
    return GPUS.get(key) if key else None


def rates(args, dev, macs: int, seconds: float) -> dict:
    img_s = args.batch / seconds
    out = {"img_s": round(img_s, 1), "tflops": round(6 * macs * img_s / 1e12, 2)}
    g = gpu_spec(dev)
    if g is not None:
        from pipeline.roofline import op_roofline
        rl = op_roofline(args.variant, args.size)
        ceiling = rl.images_per_s(args.batch, g.matmul_flops, g.fp32_flops, g.bandwidth)
        out.update(mfu=round(6 * macs * img_s / g.peak_bf16_flops, 4), roofline_img_s=round(ceiling),
                   pct_roofline=round(img_s / ceiling, 3))
    return out


def soft_ce(logits, targets):
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def batch_data(args, dev, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(dev, dtype)
    y = torch.softmax(torch.randn(args.batch, args.classes, generator=g), -1).to(dev)
    return x, y


def run_plain(args, dev, macs):
    torch.manual_seed(0)
    model = models.create_model(args.variant, num_classes=args.classes, img_size=args.size,
                                attn_backend=args.attn).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x, y = batch_data(args, dev, torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = soft_ce(model(x), y)
        loss.backward()
        opt.step()
    med, ts = timed(step, dev, args.warmup, args.runs)
    out = dict(mode="plain", step_s=round(med, 4), runs=[round(t, 4) for t in ts], **rates(args, dev, macs, med),
               syncs=host_syncs(step, dev))
    if args.profile and dev.type == "cuda":
        out["profile"] = profile_step(step, dev)
    return out


def build_ds(args, mode):
    """The engine as pipeline.engine.build_engine makes it, with the compile mode and backend given."""
    import deepspeed
    from pipeline import engine as E
    from pipeline.config import load_config
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    torch.manual_seed(0)
    compile_mode = {"ds_blocks": "blocks", "ds_engine": "engine"}.get(mode)
    cfg = load_config(None, [
        f"model.variant={args.variant}", f"model.img_size={args.size}", f"model.num_classes={args.classes}",
        f"model.attn_backend={args.attn}", f"model.compile={str(compile_mode is not None).lower()}",
        f"model.compile_mode={compile_mode or 'blocks'}", f"train.global_batch={args.batch}",
        f"train.micro_batch={args.batch}", "train.steps=10", "scaling.num_workers=1",
        f"scaling.use_gpu={str(args.device == 'cuda').lower()}"])
    ds = E.deepspeed_config(cfg)
    model = E.build_model(cfg, ds)
    opt = E.build_optimizer(cfg, model)
    E.fp32_batchnorm_stats(model)
    if compile_mode == "blocks":
        E.mark_leaf_blocks(model)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    if compile_mode:
        E.compile_engine(engine, compile_mode, backend=args.backend)
    return engine, cfg


def run_ds(args, dev, macs, mode):
    from deepspeed.utils import safe_get_full_grad
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    t0 = time.perf_counter()
    engine, cfg = build_ds(args, mode)
    build_s = time.perf_counter() - t0
    x, y = batch_data(args, dev, torch.bfloat16 if cfg.train.bf16 else torch.float32)
    losses = []

    def step():
        loss = soft_ce(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())

    t = time.perf_counter()
    loss = soft_ce(engine(x), y)      # first step: compiles; bias-table gradients before the step
    engine.backward(loss)
    tables = {}
    for n, p in engine.module.named_parameters():
        if n.endswith("relative_position_bias_table"):
            g = safe_get_full_grad(p)
            tables[n.replace("stages.", "s").replace(".attn.relative_position_bias_table", "")] = \
                None if g is None else float(g.float().norm())
    engine.step()
    losses.append(loss.detach())
    sync(dev)
    first_s = time.perf_counter() - t
    med, ts = timed(step, dev, max(0, args.warmup - 1), args.runs)
    return dict(mode=mode, build_s=round(build_s, 1), first_step_s=round(first_s, 1), step_s=round(med, 4),
                runs=[round(t, 4) for t in ts], **rates(args, dev, macs, med),
                losses_finite=bool(torch.isfinite(torch.stack(losses)).all()),
                loss_first_last=[round(float(losses[0]), 4), round(float(losses[-1]), 4)],
                graph_breaks=sum(counters["graph_break"].values()),
                unique_graphs=counters["stats"].get("unique_graphs", 0),
                break_reasons=[k.splitlines()[0][:120] for k, _ in counters["graph_break"].most_common(3)],
                tables_nonzero=all(v for v in tables.values()), table_grad_norms=tables,
                syncs=host_syncs(step, dev))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="plain,ds,ds_blocks")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variant", default="coatnet_0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "flex", "math"))
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="kernel categories of the plain step (CUDA)")
    args = p.parse_args()
    dev = torch.device(args.device)
    macs = models.count_flops(models.create_model(args.variant, img_size=args.size, device="meta"))
    say(torch=torch.__version__, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        variant=args.variant, size=args.size, batch=args.batch, attn=args.attn, gmacs_per_img=round(macs / 1e9, 3),
        date=time.strftime("%Y-%m-%d"))
    rows, failed = [], 0
    for mode in args.modes.split(","):
        try:
            row = run_plain(args, dev, macs) if mode == "plain" else run_ds(args, dev, macs, mode)
        except Exception as exc:  # noqa: BLE001 - report every mode, then fail
            failed += 1
            row = dict(mode=mode, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            traceback.print_exc(limit=6)
        rows.append(row)
        say(**row)
        if dev.type == "cuda":
            row["mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
    print("| mode | step s | img/s | MFU | % roofline | graph breaks | graphs | host syncs | tables train |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | FAILED: {r['error'][:80]} |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        roof = f"{r['pct_roofline']:.0%} of {r['roofline_img_s']:,}" if "pct_roofline" in r else "-"
        print(f"| {r['mode']} | {r['step_s']:.4f} | {r['img_s']:,.1f} | {mfu} | {roof} | {r.get('graph_breaks', '-')} | "
              f"{r.get('unique_graphs', '-')} | {sum(r['syncs'].values()) if r['syncs'] else '-'} | "
              f"{r.get('tables_nonzero', '-')} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
