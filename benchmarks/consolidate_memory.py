"""Driver memory when turning a ZeRO-3 checkpoint into fp32 weights: the whole state dict at once
(`weights.consolidate`, what the first build did) vs streamed into safetensors shards
(`weights.consolidate_to`: what a fine-tuning from an intermediate checkpoint does; the final weights
are exported by the workers); and the fine-tuning driver's work
on the same checkpoint at 384 px: the first build's path (whole state dict, tables resized on the
driver, weights written back) vs today's (`finetune.resolve_source` + `stage_init`: streamed
consolidation, a meta-device check from the safetensors headers, the files copied to init/).

    python benchmarks/consolidate_memory.py --variant coatnet_5 --world 2

Writes a real ZeRO-3 checkpoint of the variant first (W gloo ranks build it under
`deepspeed.zero.Init` and save without training: the fp32 master partitions are what consolidation
reads), then runs each consolidation in a fresh process and reports its peak RSS above the
process's baseline after imports. Disk: ~6 bytes/parameter for the checkpoint plus 4 for the output.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rank(rank: int, world: int, port: int, variant: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    import torch

    import models
    from pipeline.config import load_config
    from pipeline.engine import build_optimizer, deepspeed_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"scaling.num_workers={world}", f"train.global_batch={world}", "train.micro_batch=1"])
    ds = deepspeed_config(cfg)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = models.create_model(variant, num_classes=1000, img_size=224)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model), config=ds)
    engine.save_checkpoint(out, tag="ds")
    if rank == 0:   # what a training checkpoint carries besides the shards (fine-tuning reads it)
        from pipeline.checkpoint import STATE_FILE, TrainState

        state = TrainState(step=0, samples_seen=0, total_steps=0, loader={}, world_size=world,
                           config={"model": {"variant": variant, "img_size": 224, "num_classes": 1000}})
        with open(os.path.join(out, STATE_FILE), "w") as f:
            f.write(state.to_json())


def _measure(mode: str, ckpt: str, out: str) -> None:
    import torch  # noqa: F401 - baseline includes torch and deepspeed, as on the driver

    import deepspeed  # noqa: F401
    import mlflow  # noqa: F401 - the driver of a job has it loaded

    from pipeline import checkpoint, finetune, weights  # finetune imported in the baseline, as on the driver

    import threading

    def anon_kb() -> int:
        """Anonymous resident memory: what the process itself holds. Memory-mapped checkpoint
        pages count in RSS too, but they are page cache the kernel can drop at any time."""
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    base, base_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon_kb()
    peak_anon, done = [base_anon], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], anon_kb())
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    if mode == "whole":
        sd = weights.consolidate(ckpt)
        n = sum(v.numel() for v in sd.values())
    elif mode == "streamed":
        weights.consolidate_to(ckpt, out, max_shard_bytes=512 << 20)
        n = len(os.listdir(out))
    elif mode == "finetune-whole":     # the first build: every tensor on the driver, then written
        import models

        variant = checkpoint.read_state(ckpt).config["model"]["variant"]
        sd = weights.consolidate(ckpt)
        net = models.create_model(variant, num_classes=1000, img_size=384, device="meta")
        sd, _ = weights.adapt_state_dict(net, sd, img_size=384)
        weights.write_weights(out, sd.items())
        n = len(weights.weight_files(out))
    else:                              # today: files and headers only
        from pipeline.config import load_config

        variant = checkpoint.read_state(ckpt).config["model"]["variant"]
        cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                          [f"model.variant={variant}", "model.img_size=384", "model.num_classes=1000",
                           f"storage.storage_path={out}", "storage.name=ft"])
        with finetune.resolve_source(ckpt) as source:
            staged, _ = finetune.stage_init(cfg, source)
        n = len(weights.weight_files(staged.init.from_checkpoint))
    done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "baseline_mb": base / 1024, "peak_mb": peak / 1024,
                      "added_mb": (peak - base) / 1024, "added_anon_mb": (peak_anon[0] - base_anon) / 1024,
                      "seconds": time.time() - t0, "n": n}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="coatnet_5")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temp dir)")
    ap.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        _measure(*args._measure)
        return
    import torch.multiprocessing as mp

    import models

    work = args.workdir or tempfile.mkdtemp(prefix="consolidate-bench-")
    try:
        ckpt = os.path.join(work, "ckpt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.time()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, args.world, port, args.variant, ckpt)) for r in range(args.world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        params = sum(p.numel() for p in models.create_model(args.variant, device="meta").parameters())
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
        print(f"{args.variant}: {params / 1e9:.3f} B parameters, ZeRO-3 checkpoint of {args.world} ranks "
              f"{size / 2**30:.1f} GiB written in {time.time() - t0:.0f} s")
        rows = []
        for mode in ("whole", "streamed", "finetune-whole", "finetune"):
            out = os.path.join(work, f"out-{mode}")
            r = subprocess.run([sys.executable, __file__, "--_measure", mode, ckpt, out], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": ROOT})
            assert r.returncode == 0, r.stderr[-3000:]
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        fp32 = params * 4 / 2**20
        print(f"\n| driver work | driver baseline RSS MB | peak RSS MB | added RSS MB | added anonymous MB "
              f"| anonymous / fp32 model ({fp32:.0f} MB) | s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {r['added_mb']:.0f} | "
                  f"{r['added_anon_mb']:.0f} | {r['added_anon_mb'] / fp32:.2f} | {r['seconds']:.0f} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
