#!/usr/bin/env python
"""The device side of the data path, on the CPU and on CUDA in one run (issue 23): what each piece
costs per batch, how many times it makes the host wait, and what a loader core saves when the
JPEGs are decoded on the device.

Sections (each prints a table; one that fails prints its error and the others still run):

1. transform - ``DeviceBatchTransform.apply`` on a uint8 batch already on the device (normalise,
   label smoothing, MixUp; with and without the batched RandAugment 2/15 over the reference's 16
   ops): ms per batch (median), us per image, and the host syncs per batch. On CUDA the syncs are
   counted with ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronising call warns; the
   table names the call sites). On the CPU nothing synchronises: the table counts instead what
   would be a host->device copy on a GPU - tensors built from Python values - by call site
   (pipeline code vs torchvision's kernels). Per op group too (``--per-op``): which RandAugment
   op's torchvision kernel syncs.
2. decode - ``decode="device"``'s batch decode (``devicedecode.decode_rows``: ``decode_jpeg(list,
   device=...)``, then crop, resize and flip per image) on real photographs with the boxes the
   loader draws: ms per batch, us per image, the CPU it takes in the TRAINING process (nvjpeg
   can Huffman-decode on the host: that CPU moves from the loader to the trainer rather than
   vanishing - add it to the loader's per image for the moonshot), syncs, and the difference
   from the worker path's crops (CPU libjpeg-turbo + the same resize): 0 on the CPU, nvjpeg's
   rounding on CUDA.
3. loader (``--loader``; needs pyarrow, webdataset) - the loader's CPU per image, one DataLoader
   worker, uint8 out + RandAugment on the device: ``decode="worker"`` (decode, crop, flip in the
   worker) vs ``decode="device"`` (bytes only: read, parse, header, draw), against bare JPEG
   decode; and loader cores per GPU at the GPU's step rate (``--model``: a plain bf16 train step
   of that model measured here on CUDA, else ``--gpu-rate``).
4. step (``--model``, CUDA only) - a plain bf16 train step (forward, backward, AdamW) at
   ``--batch``, so the transform's and the decode's share of the step is printed (goal: the
   transform under 3% of coatnet_0's step at batch 256).

    python benchmarks/device_pipeline.py --devices cpu --batch 64 --img-size 224 --loader
    python benchmarks/device_pipeline.py --devices cuda --batch 256 --model coatnet_0 coatnet_3:128 --loader

Timings belong in RESULTS.md only from an idle machine: ``--append-results`` writes nothing when
the 1-minute load average is above ``--max-load`` (0.5).
"""
from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from pipeline.data.devicedecode import CropDrawer, EncodedImages, decode_rows  # noqa: E402
from pipeline.data.randaug import REFERENCE_OPS  # noqa: E402
from pipeline.data.transforms import AugmentConfig, DeviceBatchTransform, crop_transform  # noqa: E402

RESULTS_HEADING = "## Device data path (benchmarks/device_pipeline.py)"
PIPELINE_DIR = str(REPO / "pipeline")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn(i)`` over ``repeats`` calls after two warm-ups."""
    for i in range(2):
        fn(i)
    sync(device)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(100 + i)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class HostBuilt(TorchFunctionMode):
    """Tensors built from Python values (``torch.tensor`` / ``as_tensor``) by call site."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tensor", "as_tensor"):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            who = "pipeline" if where.startswith(PIPELINE_DIR) else "torchvision"
            self.sites[f"{who}:{Path(where).name}:{frame.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


def host_syncs(fn, device: torch.device) -> tuple[int, Counter]:
    """(count, call sites) of one ``fn()``: synchronising CUDA calls on CUDA; on the CPU the
    tensors built from Python values (each a host->device copy on a GPU)."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in got if "synchroniz" in str(w.message))
    else:
        with HostBuilt() as mode:
            fn()
        sites = mode.sites
    return sum(sites.values()), sites


def short(sites: Counter, n: int = 4) -> str:
    """The busiest call sites; on the CPU led by the split pipeline code / torchvision's kernels."""
    split = ""
    if any(k.startswith(("pipeline:", "torchvision:")) for k in sites):
        ours = sum(v for k, v in sites.items() if k.startswith("pipeline:"))
        split = f"pipeline {ours}, torchvision {sum(sites.values()) - ours}: "
    return split + (", ".join(f"{k} x{v}" for k, v in sites.most_common(n)) or "-")


# ---------------------------------------------------------------------------------------------
# 1. the batch transform
# ---------------------------------------------------------------------------------------------

def transform_rows(device: torch.device, batch: int, size: int, repeats: int, per_op: bool,
                   measured: dict[tuple[str, str], float]) -> list[str]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    variants = {"normalise + smoothing + MixUp": AugmentConfig(randaug_device=False),
                "+ batched RandAugment 2/15 (16 ops)": AugmentConfig(randaug_device=True)}
    if per_op:
        variants.update({f"+ RandAugment {op} only": AugmentConfig(randaug_device=True, randaug_ops=(op,))
                         for op in REFERENCE_OPS})
    rows = []
    for name, cfg in variants.items():
        tf = DeviceBatchTransform(cfg, 1000, "single")
        seconds = timed(lambda s: tf.apply(images, labels, s), device, repeats if not per_op else 3)
        count, sites = host_syncs(lambda: tf.apply(images, labels, 7), device)
        measured[(device.type, name)] = seconds
        rows.append(f"| {device.type} | {name} | {seconds * 1e3:.2f} | {seconds / batch * 1e6:.1f} | "
                    f"{count} | {short(sites)} |")
    return rows


# ---------------------------------------------------------------------------------------------
# 2. decode on the device
# ---------------------------------------------------------------------------------------------

def photographs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs q90 of ~500x375: crops of the photographs installed packages ship (as
    data_throughput.py), or, where those are absent (the GPU image), smooth synthetic scenes."""
    try:
        from data_throughput import sample_photos
        photos = [Image.open(p).convert("RGB") for p in sample_photos()]
    except (ImportError, SystemExit):
        y, x = np.mgrid[0:900, 0:1200]
        photos = [Image.fromarray(np.stack([(np.sin(x / (40 + 9 * k)) + 1) * 120, (y / 4 + 30 * k) % 256,
                                            (np.cos((x + y) / 70) + 1) * 110], -1).astype(np.uint8))
                  for k in range(3)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (500, 375) if i % 4 else (375, 500)
        buf = io.BytesIO()
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def encoded_batch(files: list[bytes], size: int, seed: int) -> EncodedImages:
    cfg = AugmentConfig()
    drawer = CropDrawer(size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, 1 << 40)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boxes = [drawer(f) for f in files]
    return EncodedImages.pack(files, list(range(len(files))), boxes, size, cfg.interpolation)  # type: ignore[arg-type]


def worker_path(files: list[bytes], size: int, seed: int) -> torch.Tensor:
    """The same crops as the loader's worker decode makes them (decode, RandomResizedCrop, flip)."""
    from pipeline.data.reader import decode_rgb8

    transform = crop_transform(AugmentConfig(randaug_device=True), size, train=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(decode_rgb8(f)) for f in files])


def decode_rows_table(device: torch.device, files: list[bytes], size: int, repeats: int,
                      measured: dict[tuple[str, str], float]) -> list[str]:
    encoded = encoded_batch(files, size, seed=3)
    empty = torch.empty(0, 3, size, size, dtype=torch.uint8)
    seconds = timed(lambda _: decode_rows(empty, encoded, device), device, repeats)
    cpu0 = time.process_time()      # the host's share (nvjpeg may Huffman-decode on the CPU)
    for _ in range(repeats):
        decode_rows(empty, encoded, device)
    sync(device)
    host_ms = (time.process_time() - cpu0) / repeats / len(files) * 1e3
    from torchvision.io import ImageReadMode, decode_jpeg
    views = [encoded.data[a:b] for a, b in zip(encoded.offsets[:-1], encoded.offsets[1:])]
    decode_only = timed(lambda _: decode_jpeg(views, mode=ImageReadMode.RGB, device=device), device, repeats)
    count, sites = host_syncs(lambda: decode_rows(empty, encoded, device), device)
    measured[(device.type, "decode")] = seconds
    got = decode_rows(empty, encoded, device).cpu().int()
    want = worker_path(files, size, seed=3).int()
    diff = (got - want).abs()
    n = len(files)
    return [f"| {device.type} | {n} | {seconds * 1e3:.1f} | {seconds / n * 1e6:.0f} | {decode_only / n * 1e6:.0f} | "
            f"{host_ms:.3f} | "
            f"{count} ({short(sites, 2)}) | {diff.max().item()} | {diff.float().mean().item():.3f} | "
            f"{(diff > 2).float().mean().item():.2%} |"]


# ---------------------------------------------------------------------------------------------
# 3. the loader's CPU per image, 4. a plain train step
# ---------------------------------------------------------------------------------------------

def loader_table(files: list[bytes], size: int, batch: int, rounds: int, gpu_rates: dict[str, float],
                 rate_source: str) -> list[str]:
    import shutil
    import tempfile

    from data_throughput import best, cpu_ms_per_item, measure, ours_loader, pil_decode, tv_decode

    from pipeline.data import ShardIndex, ShardOptions, write_shards

    work = Path(tempfile.mkdtemp(prefix="device_pipeline_"))
    try:
        for i, f in enumerate(files):
            target = work / "photos" / f"class{i % 10}" / f"{i:06d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f)
        write_shards(str(work / "photos"), str(work / "shards"),
                     options=ShardOptions(num_workers=1, progress=False, samples_per_shard=128))
        index = ShardIndex.load(str(work / "shards" / "train"))
        base = dict(output="uint8", augment=AugmentConfig(randaug_device=True))
        runs: dict[str, list] = {"worker": [], "device": []}
        for _ in range(rounds):
            for decode in runs:
                runs[decode].append(measure(lambda: ours_loader(index, size, batch, decode=decode, **base), len))
        rates = {k: best(v) for k, v in runs.items()}
        bare = {"PIL": 1e3 / cpu_ms_per_item(pil_decode, files, rounds),
                "torchvision.io": 1e3 / cpu_ms_per_item(tv_decode, files, rounds)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    def cores(per_core: float) -> str:
        return ", ".join(f"{m}: {math.ceil(r / per_core)}" for m, r in gpu_rates.items())

    rows = []
    for decode, rate in rates.items():
        label = ("decode in the worker (decode, crop, flip)" if decode == "worker"
                 else "decode on the device (bytes only: read, parse, header, draw)")
        rows.append(f"| {label} | {rate.per_core:.0f} | {rate.per_worker_core:.0f} | {1e3 / rate.per_core:.3f} | "
                    f"{rate.per_core / bare['PIL']:.2f}x | {cores(rate.per_core)} |")
    for name, value in bare.items():
        rows.append(f"| bare decode, {name} (one process, no loader) | {value:.0f} | | {1e3 / value:.3f} | "
                    f"{value / bare['PIL']:.2f}x | {cores(value)} |")
    rates_text = ", ".join(f"{m} {r:.0f} img/s" for m, r in gpu_rates.items())
    rows.append(f"\nLoader cores per GPU = ceil(GPU img/s / loader img/s per core), GPU: {rates_text} ({rate_source}).")
    return rows


def step_rate(model_name: str, device: torch.device, batch: int, size: int, repeats: int) -> float:
    """Images per second of a plain bf16-autocast train step (forward, backward, AdamW)."""
    import models

    model = models.create_model(model_name, num_classes=1000, img_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.softmax(torch.randn(batch, 1000, device=device), -1)

    def step(_):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch / timed(step, device, repeats)


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sections", nargs="*", default=["transform", "decode"], choices=["transform", "decode"])
    p.add_argument("--per-op", action="store_true", help="the transform's syncs per RandAugment op")
    p.add_argument("--loader", action="store_true", help="the loader's CPU per image, worker vs device decode")
    p.add_argument("--loader-images", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", nargs="*", default=[],
                   help="NAME[:BATCH]: measure a plain bf16 train step of these models on CUDA (batch: --batch)")
    p.add_argument("--gpu-rate", type=float, default=1500.0, help="img/s per GPU when --model is not measured")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--max-load", type=float, default=0.5, help="--append-results refuses above this load")
    args = p.parse_args(argv)
    devices = [torch.device(d) for d in args.devices]
    cuda = next((d for d in devices if d.type == "cuda"), None)
    name = torch.cuda.get_device_name(cuda) if cuda is not None else "no GPU"
    head = (f"{datetime.date.today()}, {name}, torch {torch.__version__}, "
            f"{os.cpu_count()} cores visible, load {os.getloadavg()[0]:.1f}; batch {args.batch}, {args.img_size} px")
    print(head)
    out = [head, ""]

    def section(title: str, header: str, make) -> list[str]:
        lines = [title, "", header, "|" + "---|" * (header.count("|") - 1)]
        try:
            lines += make()
        except Exception:       # noqa: BLE001 - one failing section must not hide the others
            lines.append(f"FAILED: {traceback.format_exc().strip().splitlines()[-1]}")
            traceback.print_exc()
        print("\n".join(lines) + "\n", flush=True)
        return lines + [""]

    rates: dict[str, float] = {}
    measured: dict[tuple[str, str], float] = {}
    if args.model and cuda is not None:
        def step_rows():
            rows = []
            for spec in args.model:              # NAME or NAME:BATCH
                model, _, batch = spec.partition(":")
                batch = int(batch or args.batch)
                try:
                    rates[model] = step_rate(model, cuda, batch, args.img_size, args.repeats)
                    rows.append(f"| {model} | {batch} | {batch / rates[model] * 1e3:.1f} | {rates[model]:.0f} |")
                except torch.OutOfMemoryError:
                    rows.append(f"| {model} | {batch} | out of memory | |")
                torch.cuda.empty_cache()
            return rows
        out += section(f"Plain bf16 train step, eager ({name}): the step time the transform's share is of",
                       "| model | batch | ms/step | img/s |", step_rows)
    if "transform" in args.sections:
        out += section("DeviceBatchTransform.apply (uint8 batch already on the device)",
                       "| device | transform | ms/batch | us/img | host syncs per batch (cuda) / tensors built from host values (cpu) | where |",
                       lambda: [r for d in devices for r in transform_rows(d, args.batch, args.img_size,
                                                                            args.repeats, args.per_op, measured)])
    if "decode" in args.sections:
        files = photographs(args.batch)
        out += section("decode='device': decode_rows on ~500x375 JPEG q90 (decode, crop, resize, flip)",
                       "| device | images | ms/batch | us/img | of it decode_jpeg us/img | trainer-process CPU ms/img | "
                       "host syncs | "
                       "max diff vs worker path | mean abs diff | pixels off by > 2 |",
                       lambda: [r for d in devices for r in decode_rows_table(d, files, args.img_size, args.repeats,
                                                                              measured)])
    if args.loader:
        gpu_rates = rates or {"assumed": args.gpu_rate}
        source = f"plain bf16 steps measured on {name}" if rates else "ASSUMED, --gpu-rate"
        out += section("Loader CPU per image, one DataLoader worker, uint8 out + RandAugment on the device",
                       "| loader | img/s per core | worker-only img/s per core | CPU ms/img | / bare PIL | "
                       "loader cores per GPU |",
                       lambda: loader_table(photographs(args.loader_images, seed=1), args.img_size, 64,
                                            args.rounds, gpu_rates, source))

    shares = [f"- {what} on cuda: {measured[('cuda', what)] * 1e3:.2f} ms per batch of {args.batch} = "
              f"{measured[('cuda', what)] * rates[m] / args.batch:.1%} of {m}'s step"
              for what in ("+ batched RandAugment 2/15 (16 ops)", "decode") if ("cuda", what) in measured
              for m in rates]
    if shares:
        shares = ["Share of the plain step (goal: the transform under 3% of coatnet_0's at batch 256):", *shares]
        print("\n".join(shares))
        out += shares
    if args.append_results:
        load = os.getloadavg()[0]
        if load > args.max_load:
            print(f"not written to RESULTS.md: load average {load:.1f} > {args.max_load} (a busy machine)")
            return 0
        from data_throughput import write_results_section

        write_results_section(RESULTS_HEADING, f"{RESULTS_HEADING}\n\n" + "\n".join(out).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
