"""Host memory per rank when a fine-tuning engine takes its source weights: streamed into the
ZeRO-3 partitions (``engine.load_init_weights``: each rank reads only the elements it owns) against
the first build's path (``engine.build_model`` before this change: every rank loads the whole
safetensors state dict, gathers every parameter with ``GatheredParameters(modifier_rank=0)``, and
rank 0 runs the surgery and ``load_state_dict``), as a multiple of the rank's share of the fp32
model (fp32 bytes / W). Both run on the same engine (the recipe's network, built under
``deepspeed.zero.Init``, ``deepspeed.initialize``d), so the figure is what loading adds.

    python benchmarks/finetune_init_memory.py                      # coatnet_5 224 -> 512 px, W=2
    python benchmarks/finetune_init_memory.py --variant coatnet_0 --img-size 384 --modes streamed whole

The source is a sharded safetensors folder (512 MB shards) of synthetic fp32 values for the variant
at 224 px with another class count (the head is replaced, the tables resized), written tensor by
tensor (disk: 4 bytes/parameter, ~2.8 GB for coatnet_5). Each mode runs in fresh gloo processes; a
thread samples the process's RSS every 5 ms during the load, and the table reports the peak above
the RSS just before. Memory, not time, is the claim: the figure does not depend on machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RANK = r"""
import json, os, sys, threading, time
rank, world, port, cfg_json, mode, out = sys.argv[1:7]
rank, world = int(rank), int(world)
os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port)
import torch
torch.set_num_threads(1)
import deepspeed
import torch.distributed as dist
from pipeline.config import config_from_dict
from pipeline.engine import build_engine, deepspeed_config, load_init_weights

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

deepspeed.init_distributed(dist_backend="gloo")
cfg = config_from_dict(json.loads(cfg_json))
t0 = time.perf_counter()
engine, _ = build_engine(cfg, deepspeed_config(cfg, use_gpu=False))
build_s = time.perf_counter() - t0
share = sum(p.ds_tensor.numel() * 4 for p in engine.module.parameters())
dist.barrier()
base, peak, done = rss(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)

watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
t0 = time.perf_counter()
if mode == "streamed":
    load_init_weights(engine, cfg)
else:                        # the first build's engine.build_model, on the same engine
    from pipeline.weights import adapt_state_dict, load_weights
    import models
    m = cfg.model
    sd = load_weights(cfg.init.from_checkpoint)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0):
        if rank == 0:
            net = models.create_model(m.variant, num_classes=m.num_classes, img_size=m.img_size, device="meta",
                                      **m.architecture())
            sd, dropped = adapt_state_dict(net, sd, img_size=m.img_size, reset_head=False, strict=True)
            engine.module.load_state_dict(sd, strict=False)
    del sd
load_s = time.perf_counter() - t0
dist.barrier()
done.set()
watcher.join()
peak[0] = max(peak[0], rss())
with open(f"{out}/{mode}-{rank}.json", "w") as f:
    json.dump({"rank": rank, "share": share, "base": base, "peak": peak[0], "build_s": build_s, "load_s": load_s}, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_source(variant: str, preset: str, classes: int, folder: str) -> int:
    """Synthetic fp32 weights of ``variant`` at 224 px, one tensor made at a time."""
    import torch

    import models
    from pipeline.weights import write_weights

    net = models.create_model(variant, num_classes=classes, img_size=224, preset=preset, device="meta")
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                yield name, torch.randn(t.shape, generator=gen) * 0.02
            else:
                yield name, torch.zeros(t.shape, dtype=t.dtype)
    write_weights(folder, tensors())
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/finetune_coatnet_5_jft_to_1k_512.yaml")
    ap.add_argument("--variant", default=None, help="default: the recipe's")
    ap.add_argument("--img-size", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["streamed", "whole"], choices=["streamed", "whole"])
    ap.add_argument("--work", default=None, help="folder for the source weights (default: a temp dir, removed)")
    a = ap.parse_args()

    from pipeline.config import load_config

    overrides = [f"scaling.num_workers={a.world}", "scaling.use_gpu=false", "scaling.accelerator_type=null",
                 "model.num_classes=1000",
                 f"train.global_batch={4 * a.world}", "train.micro_batch=4", "model.compile=false"]
    overrides += [f"model.variant={a.variant}"] if a.variant else []
    overrides += [f"model.img_size={a.img_size}"] if a.img_size else []
    work = a.work or tempfile.mkdtemp(prefix="ft-init-")
    try:
        src = os.path.join(work, "source")
        cfg0 = load_config(os.path.join(ROOT, a.config), overrides)
        t0 = time.perf_counter()
        params = write_source(cfg0.model.variant, cfg0.model.preset, 1001, src)
        print(f"source: {cfg0.model.variant} ({params / 1e6:.0f}M parameters, {params * 4 / 2**30:.2f} GiB fp32) "
              f"at 224 px in {time.perf_counter() - t0:.0f} s -> {cfg0.model.img_size} px, world {a.world}", flush=True)
        cfg = load_config(os.path.join(ROOT, a.config), overrides + [f"init.from_checkpoint={src}"])
        script = os.path.join(work, "rank.py")
        with open(script, "w") as f:
            f.write(RANK)
        rows = []
        for mode in a.modes:
            port = str(free_port())
            env = {**os.environ, "PYTHONPATH": ROOT}
            procs = [subprocess.Popen([sys.executable, script, str(r), str(a.world), port,
                                       json.dumps(cfg.model_dump(mode="json")), mode, work], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for r in range(a.world)]
            logs = [p.communicate()[0] for p in procs]
            if any(p.returncode for p in procs):
                sys.exit(f"{mode}: a rank failed:\n" + "\n".join(log[-2000:] for log in logs))
            for r in range(a.world):
                with open(os.path.join(work, f"{mode}-{r}.json")) as f:
                    rows.append((mode, json.load(f)))
        print(f"\n{'mode':<10} {'rank':>4} {'share GiB':>10} {'added GiB':>10} {'x share':>8} {'load s':>7}")
        for mode, r in rows:
            added = (r["peak"] - r["base"]) / 2**30
            print(f"{mode:<10} {r['rank']:>4} {r['share'] / 2**30:>10.2f} {added:>10.2f} "
                  f"{added / (r['share'] / 2**30):>8.2f} {r['load_s']:>7.1f}")
        print("\nshare: the rank's fp32 partitions (fp32 model / world); added: peak RSS during the load above "
              "the RSS before it; goal for streamed: under 1.5x share.")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
