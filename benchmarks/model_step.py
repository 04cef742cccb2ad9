"""Our CoAtNet against timm's: one AdamW train step and one eval forward, eager and compiled.

Both models hold the same weights (ours loaded from timm's via models.from_timm_state_dict) and see
the same inputs. Runs are INTERLEAVED (every contender once per round, order rotated each round) so
that load from other processes on a shared machine hits all alike. Reports the median of ``--runs``
timed rounds after ``--warmup`` untimed ones (which also pay for torch.compile), images/s, ratios,
MFU and the bytes of tensors saved for backward in one eager train step (activation memory).

"% roofline" (CUDA, H100/H200, train steps) = images/s over the modelled ceiling of
pipeline.roofline at this variant, size and batch (the issue-22 goal: >= 90% for coatnet_3).
MFU = model FLOPs / step time / device peak. Model FLOPs = models.count_flops (MACs of one eval
forward) x 2 (FLOPs per MAC) x 3 for a train step (backward ~ 2x forward); x 1 for eval. Peaks:
dense bf16 / tf32 tensor-core figures of NVIDIA's datasheets for H100/H200 SXM (CUDA), and on the
CPU a measured peak: the best of a few large matmuls at the run's dtype and thread count.

    .venv/bin/python benchmarks/model_step.py --variant coatnet_0 --batch 8 --runs 5 --threads 2
    .venv/bin/python benchmarks/model_step.py --device cuda --dtype bf16 --compile --batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's models/, not an installed copy
import models  # noqa: E402

# Dense (no sparsity) tensor-core peaks, FLOP/s, SXM parts (NVIDIA datasheets).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp32": 494.7e12},  # fp32 = TF32 tensor cores (torch 'high' matmul precision)
    "H200": {"bf16": 989e12, "fp32": 494.7e12},
}
TIMM_NAMES = {f"coatnet_{i}": f"coatnet_{i}_224" for i in range(6)}


def saved_activation_bytes(step: Callable[[], None]) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_cpu_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def device_peak(device: torch.device, dtype_name: str, dtype: torch.dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks[dtype_name], f"{name}, datasheet {dtype_name} peak"
        return float("nan"), f"{name}: no peak in GPU_PEAKS"
    return measured_cpu_peak(dtype), f"CPU, measured 2048^3 {dtype_name} matmul, {torch.get_num_threads()} threads"


def roofline_images_per_s(device: torch.device, variant: str, size: int, batch: int) -> float | None:
    """The modelled bf16 train-step ceiling (pipeline.roofline) on this GPU, None off H100/H200."""
    if device.type != "cuda":
        return None
    from pipeline.capacity import GPUS
    from pipeline.roofline import op_roofline

    name = torch.cuda.get_device_name(device)
    key = "H200" if "H200" in name else "H100-SXM" if "H100" in name else None
    if key is None:
        return None
    g = GPUS[key]
    return op_roofline(variant, size).images_per_s(batch, g.matmul_flops, g.fp32_flops, g.bandwidth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="coatnet_0", help="models.list_models(); timm joins for coatnet_0..5")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled contenders (ours: compile_blocks; timm: whole-model compile)")
    parser.add_argument("--attn-backend", default="auto", choices=("auto", "sdpa", "flex", "math"))
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def build_ours() -> torch.nn.Module:
        return models.create_model(args.variant, img_size=args.size, attn_backend=args.attn_backend)

    ours = build_ours()
    contenders: dict[str, torch.nn.Module] = {"ours": ours}
    timm_name = None if args.no_timm else TIMM_NAMES.get(args.variant)
    if timm_name:
        import timm

        reference = timm.create_model(timm_name, img_size=args.size)
        ours.load_state_dict(models.from_timm_state_dict(reference.state_dict(), img_size=args.size))
        contenders["timm"] = reference
    if args.compile:
        for name in list(contenders):
            twin = build_ours() if name == "ours" else timm.create_model(timm_name, img_size=args.size)
            twin.load_state_dict(contenders[name].state_dict())
            if name == "ours":
                twin.compile_blocks()
            else:
                twin.compile()
            contenders[f"{name} compiled"] = twin
    for model in contenders.values():
        model.to(device)

    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in contenders.items()}

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    def train_step(name: str) -> Callable[[], None]:
        def step() -> None:
            model = contenders[name].train()
            optimizers[name].zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizers[name].step()
        return step

    def eval_step(name: str) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast():
                contenders[name].eval()(images)
        return step

    max_rel_error = float("nan")
    if "timm" in contenders:
        with torch.no_grad():
            a, b = contenders["ours"].eval()(images), contenders["timm"].eval()(images)
        max_rel_error = ((a - b).abs().max() / b.abs().max()).item()

    names = list(contenders)
    times: dict[tuple[str, str], list[float]] = {(k, n): [] for k in ("train", "eval") for n in names}
    for run in range(args.warmup + args.runs):
        order = names[run % len(names):] + names[:run % len(names)]
        for kind, make in (("train", train_step), ("eval", eval_step)):
            for name in order:
                synchronize(device)
                start = time.perf_counter()
                make(name)()
                synchronize(device)
                if run >= args.warmup:
                    times[(kind, name)].append(time.perf_counter() - start)
    saved = {name: saved_activation_bytes(train_step(name)) for name in names if "compiled" not in name}

    macs = models.count_flops(models.create_model(args.variant, img_size=args.size, device="meta"),
                              batch_size=args.batch)
    peak, peak_source = device_peak(device, args.dtype, dtype)
    roof = roofline_images_per_s(device, args.variant, args.size, args.batch)
    print(f"{args.variant}, batch {args.batch}, {args.size} px, {args.device} {args.dtype}, attn {args.attn_backend}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}; median of {args.runs} "
          f"interleaved runs after {args.warmup} warm-up; logits max rel. error ours vs timm {max_rel_error:.1e}")
    print(f"model: {macs / args.batch / 1e9:.2f} GMACs/image; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    print("| step | contender | time, s | images/s | vs ours eager | MFU | % roofline |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("train", "eval"):
        flops = macs * 2 * (3 if kind == "train" else 1)
        base = statistics.median(times[(kind, "ours")])
        for name in names:
            median = statistics.median(times[(kind, name)])
            pct = f"{args.batch / median / roof:.0%} of {roof:,.0f}" if roof and kind == "train" else "-"
            print(f"| {kind} | {name} | {median:.3f} | {args.batch / median:.1f} | {median / base:.2f} | "
                  f"{flops / median / peak:.1%} | {pct} |")
    if len(saved) > 1:
        print("saved activations, train step, MB: " + ", ".join(f"{n} {b / 2**20:.0f}" for n, b in saved.items()))
    else:
        print(f"saved activations, train step, MB: ours {saved['ours'] / 2**20:.0f}")
    for kind in ("train", "eval"):
        for name in names:
            print(f"# {kind} {name} all runs: {', '.join(f'{t:.3f}' for t in times[(kind, name)])}")


if __name__ == "__main__":
    main()
