#!/usr/bin/env python
"""One bf16 training step per attention backend: does every relative-position bias table get a
finite, non-zero gradient, equal to the math reference's? (The check issue 13 asks for before any
GPU benchmark; a script, never a test: no test may need a GPU.)

For each backend (sdpa, flex eager, flex under torch.compile, math) the same model (same weights,
same batch) takes one forward + backward under bf16 autocast. Printed per backend: the backend
that ran, whether it raised, the smallest |grad| norm over the bias tables (must be > 0), and the
relative difference |g - g_math| / |g_math| of the bias tables' and of all gradients.
Exit status 1 when a backend fails or a table gets no gradient.

    python benchmarks/gpu_check.py                       # CUDA, coatnet_0 at 224, batch 16
    python benchmarks/gpu_check.py --device cpu --variant coatnet_pico --size 64 --dtype fp32
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402


def step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype,
         compile_model: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn = torch.compile(model) if compile_model else model
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = torch.nn.functional.cross_entropy(fn(images).float(), labels)
    loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variant", default="coatnet_0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--backends", default="sdpa,flex,flex+compile,math")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {args.variant} @ {args.size}, batch {args.batch}, {args.dtype}")
    torch.manual_seed(0)
    model = models.create_model(args.variant, num_classes=1000, img_size=args.size).to(device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    # a 1x1 token grid (a tiny image) has one relative position: softmax ignores it, no gradient
    tables = [n for n, p in model.named_parameters()
              if n.endswith("relative_position_bias_table") and p[0].numel() > 1]

    grads: dict[str, dict[str, torch.Tensor]] = {}
    failures = 0
    print(f"\n{'backend':<16} {'status':<8} {'min |grad table|':>17} {'table vs math':>14} {'all vs math':>12}")
    for spec in ["math"] + [b for b in args.backends.split(",") if b != "math"]:
        backend, _, compiled = spec.partition("+")
        model.set_attn_backend(backend)
        try:
            grads[spec] = step(model, images, labels, dtype, compiled == "compile")
        except Exception as exc:  # noqa: BLE001 - report every backend, then fail
            failures += 1
            print(f"{spec:<16} {'FAILED':<8} {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            traceback.print_exc(limit=2, file=sys.stderr)
            continue
        g = grads[spec]
        smallest = min((g[t].norm().item() if t in g else 0.0) for t in tables)
        finite = all(torch.isfinite(v).all() for v in g.values())
        ref = grads["math"]
        def rel(names: list[str]) -> float:   # |g - ref| / |ref| over the named tensors together
            names = [n for n in names if n in g and n in ref]
            diff = sum((g[n] - ref[n]).square().sum().item() for n in names) ** 0.5
            return diff / max(sum(ref[n].square().sum().item() for n in names) ** 0.5, 1e-12)

        ok = smallest > 0 and finite and len(tables) > 0
        failures += not ok
        print(f"{spec:<16} {'ok' if ok else 'BAD':<8} {smallest:>17.3e} {rel(tables):>14.2e} {rel(list(ref)):>12.2e}")
    print(f"\n{len(tables)} bias tables; {'all backends train the bias' if not failures else f'{failures} backend(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
