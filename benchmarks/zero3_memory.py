"""Per-rank model-state memory under DeepSpeed ZeRO-3 (bf16 + AdamW) at W ranks, against the
ideal 16*N/W bytes (2 bf16 params + 2 bf16 grads + 4 fp32 master + 8 Adam moments, per parameter),
and the largest variant that can be *built* partitioned (deepspeed.zero.Init) at W=2 here.

    python benchmarks/zero3_memory.py [--variants coatnet_pico coatnet_0] [--build coatnet_7]

Runs W plain processes on gloo (no Ray: this measures DeepSpeed's partitioning, not the launcher).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "torch_extensions"))


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))


def worker(rank: int, world: int, port: int, variant: str, build_only: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    import models
    from pipeline.config import Config
    from pipeline.engine import deepspeed_config, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = Config.model_validate({"model": {"variant": variant, "img_size": 224, "num_classes": 1000,
                                           "zero_init": True},
                                 "train": {"steps": 1, "global_batch": world, "micro_batch": 1},
                                 "scaling": {"num_workers": world}})
    ds = deepspeed_config(cfg)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = models.create_model(variant, num_classes=1000, img_size=224)
    n = sum(p.ds_numel for p in model.parameters())
    res = {"variant": variant, "rank": rank, "world": world, "params": n,
           "param_partition_bytes": _nbytes(p.ds_tensor for p in model.parameters())}
    if not build_only:
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        x = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)
        loss = engine(x).float().mean()
        engine.backward(loss)
        engine.step()            # optimizer states exist after the first step
        o = engine.optimizer
        master = _nbytes(o.fp32_partitioned_groups_flat)
        moments = _nbytes(v for st in o.optimizer.state.values() for v in st.values())
        grads = _nbytes([o.grad_partitions_flat_buffer]) if getattr(o, "grad_partitions_flat_buffer", None) is not None else 0
        res.update(master_bytes=master, moment_bytes=moments, grad_bytes=grads)
        res["model_state_bytes"] = res["param_partition_bytes"] + master + moments + grads
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res, f)


def measure(variant: str, world: int, build_only: bool) -> list[dict]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(prefix="z3mem")
    mp.start_processes(worker, args=(world, port, variant, build_only, out), nprocs=world,
                       start_method="spawn", join=True)
    res = [json.load(open(f"{out}.{r}")) for r in range(world)]
    for r in range(world):
        os.remove(f"{out}.{r}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["coatnet_pico", "coatnet_0"])
    ap.add_argument("--build", nargs="*", default=["coatnet_7"])
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args()
    print(f"\n## ZeRO-3 model-state bytes per rank, W={a.world} (bf16 + AdamW, gloo, CPU)\n")
    print("| variant | params | ideal 16N/W (MB) | measured rank 0 / 1 (MB) | ratio | peak RSS rank 0 (GB) |")
    print("|---|---|---|---|---|---|")
    for v in a.variants:
        rs = measure(v, a.world, False)
        ideal = 16 * rs[0]["params"] / a.world
        meas = [r["model_state_bytes"] for r in rs]
        print(f"| {v} | {rs[0]['params'] / 1e6:.2f} M | {ideal / 1e6:.1f} | "
              f"{' / '.join(f'{m / 1e6:.1f}' for m in meas)} | {max(meas) / ideal:.3f} | "
              f"{rs[0]['peak_rss_bytes'] / 1e9:.2f} |", flush=True)
    if a.build:
        print(f"\n## Built partitioned under deepspeed.zero.Init, W={a.world} (bf16 params only, no optimizer)\n")
        print("| variant | params | bf16 partition per rank (GB) | ideal 2N/W (GB) | peak RSS per rank (GB) |")
        print("|---|---|---|---|---|")
        for v in a.build:
            rs = measure(v, a.world, True)
            part = " / ".join(f"{r['param_partition_bytes'] / 1e9:.2f}" for r in rs)
            rss = " / ".join(f"{r['peak_rss_bytes'] / 1e9:.2f}" for r in rs)
            print(f"| {v} | {rs[0]['params'] / 1e9:.3f} B | {part} | "
                  f"{2 * rs[0]['params'] / a.world / 1e9:.2f} | {rss} |", flush=True)


if __name__ == "__main__":
    main()
