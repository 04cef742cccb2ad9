"""Training throughput of the whole path against its bare limit: the full Ray Train + DeepSpeed
ZeRO-3 job fed by the real loader (pipeline.launch, as `python jobs/pretrain.py` runs it) against a
plain single-process PyTorch loop (AdamW) on one fixed in-memory batch of the same global size and
model, plus the time from job start to the first optimizer step.

    python benchmarks/overhead.py [--steps 30] [--global-batch 64] [--img 32]        # 2 CPU ranks
    python benchmarks/overhead.py --gpu --workers 1 --variant coatnet_0 --img 224 --global-batch 128
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "torch_extensions"))
os.environ.pop("RAY_ADDRESS", None)


def plain(variant: str, gb: int, img: int, steps: int, gpu: bool) -> tuple[float, float]:
    import torch

    import models
    torch.set_num_threads(2)
    dev = torch.device("cuda" if gpu else "cpu")
    t0 = time.time()
    m = models.create_model(variant, num_classes=10, img_size=img).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, y = torch.randn(gb, 3, img, img, device=dev), torch.randint(0, 10, (gb,), device=dev)
    times = []
    first = None
    for _ in range(steps):
        s = time.time()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.time() - s)
        first = first or time.time() - t0
    return sorted(times[2:])[len(times[2:]) // 2], first


def distributed(variant: str, gb: int, img: int, steps: int, workers: int, gpu: bool) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    from pipeline import launch
    from pipeline.config import load_config

    tmp = tempfile.mkdtemp(prefix="ovh")
    uri = f"sqlite:///{tmp}/m.db"
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"),
                      [f"data.root={tmp}/demo", "data.demo_num_train=2000", "data.demo_num_val=64",
                       f"model.variant={variant}", f"model.img_size={img}", f"train.steps={steps}",
                       f"train.global_batch={gb}", f"train.micro_batch={gb // workers}", "train.log_every=1",
                       f"scaling.num_workers={workers}", f"scaling.use_gpu={str(gpu).lower()}",
                       f"data.demo_image_size={max(img, 32)}",
                       "train.eval_every=0", f"train.checkpoint_every={steps}", f"storage.storage_path={tmp}/runs",
                       f"tracking.tracking_uri={uri}", "tracking.experiment=overhead"])
    launch.prepare(cfg)            # write the demo shards before the clock starts
    t0 = time.time()
    s = launch.run(cfg)
    c = MlflowClient(uri)
    hist = sorted(c.get_metric_history(s.mlflow_run_id, "train/loss"), key=lambda m: m.step)
    ts = [m.timestamp / 1000 for m in hist]
    step_times = sorted(b - a for a, b in zip(ts[2:], ts[3:]))
    return step_times[len(step_times) // 2], ts[0] - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="coatnet_pico")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="GPU workers (one GPU each) and a GPU plain loop")
    a = ap.parse_args()
    p_step, p_first = plain(a.variant, a.global_batch, a.img, a.steps, a.gpu)
    d_step, d_first = distributed(a.variant, a.global_batch, a.img, a.steps, a.workers, a.gpu)
    where = f"{a.workers} GPU workers" if a.gpu else f"{a.workers} CPU workers"
    print(f"\n## Throughput: Ray Train + DeepSpeed ZeRO-3 + the real loader ({where}) vs a plain loop on "
          f"one in-memory batch ({a.variant}, {a.img}px, global batch {a.global_batch}, median step)\n")
    print("| path | step time (s) | images/s | time to first step (s) |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch, 1 process, fp32, fixed batch (bare limit) | {p_step:.3f} | "
          f"{a.global_batch / p_step:.0f} | {p_first:.1f} |")
    print(f"| Ray + DeepSpeed ZeRO-3 + StreamingLoader, bf16 | {d_step:.3f} | {a.global_batch / d_step:.0f} | "
          f"{d_first:.1f} |")
    print(f"\nratio full path / bare limit step time: {d_step / p_step:.2f}")


if __name__ == "__main__":
    main()
