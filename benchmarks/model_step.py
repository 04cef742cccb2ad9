"""Our coatnet_0 against timm's coatnet_0_224: one AdamW train step and one eval forward.

Both models hold the same weights (ours loaded from timm's via models.from_timm_state_dict) and see
the same inputs on the same number of threads. Runs are INTERLEAVED (ours, timm, timm, ours, ...)
so that load from other processes on a shared machine hits both alike. Reports the median of
``--runs`` timed runs after ``--warmup`` untimed ones, the ratio ours/timm, and the bytes of tensors
saved for backward in one train step (activation memory, unique storages).

    .venv/bin/python benchmarks/model_step.py --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's models/, not an installed copy
import models  # noqa: E402


def saved_activation_bytes(step: Callable[[], None]) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    reference = timm.create_model("coatnet_0_224", img_size=args.size)
    ours = models.create_model("coatnet_0", img_size=args.size)
    ours.load_state_dict(models.from_timm_state_dict(reference.state_dict(), img_size=args.size))
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    contenders = {"ours": ours, "timm": reference}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in contenders.items()}

    def train_step(name: str) -> Callable[[], None]:
        def step() -> None:
            model = contenders[name].train()
            optimizers[name].zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizers[name].step()
        return step

    def eval_step(name: str) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                contenders[name].eval()(images)
        return step

    with torch.no_grad():
        a, b = ours.eval()(images), reference.eval()(images)
    max_rel_error = ((a - b).abs().max() / b.abs().max()).item()

    times: dict[tuple[str, str], list[float]] = {(k, n): [] for k in ("train", "eval") for n in contenders}
    for run in range(args.warmup + args.runs):
        order = ["ours", "timm"] if run % 2 == 0 else ["timm", "ours"]
        for kind, make in (("train", train_step), ("eval", eval_step)):
            for name in order:
                start = time.perf_counter()
                make(name)()
                elapsed = time.perf_counter() - start
                if run >= args.warmup:
                    times[(kind, name)].append(elapsed)
    saved = {name: saved_activation_bytes(train_step(name)) for name in contenders}

    print(f"coatnet_0, batch {args.batch}, {args.size} px, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.machine()}; median of {args.runs} interleaved runs after {args.warmup} warm-up; "
          f"logits max rel. error ours vs timm {max_rel_error:.1e}")
    print("| measurement | ours | timm | ours/timm |")
    print("|---|---|---|---|")
    for kind in ("train", "eval"):
        mine, theirs = statistics.median(times[(kind, "ours")]), statistics.median(times[(kind, "timm")])
        label = "train step (fwd+bwd+AdamW), s" if kind == "train" else "eval forward, s"
        print(f"| {label} | {mine:.3f} | {theirs:.3f} | {mine / theirs:.2f} |")
    print(f"| saved activations, train step, MB | {saved['ours'] / 2**20:.0f} | {saved['timm'] / 2**20:.0f} | "
          f"{saved['ours'] / saved['timm']:.2f} |")
    for kind in ("train", "eval"):
        for name in contenders:
            print(f"# {kind} {name} all runs: {', '.join(f'{t:.3f}' for t in times[(kind, name)])}")


if __name__ == "__main__":
    main()
