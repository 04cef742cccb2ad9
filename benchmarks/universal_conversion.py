"""The reshard conversion of a ZeRO-3 checkpoint into DeepSpeed's universal format
(`pipeline.checkpoint.to_universal`: a view of the recorded world's ranks, then DeepSpeed's
`ds_to_universal.main` with parallel extract / merge workers) against DeepSpeed's converter called
directly with 1 extract and 1 merge worker (what `to_universal` did before it took `workers`; the
`ds_to_universal` command line's own defaults are 4 and 2): wall time and its phases, the
node-local disk the conversion needs (input, output, and the peak of the output folder while
DeepSpeed's temporary fragment folder is in it), files written, and the largest process's RSS.

    python benchmarks/universal_conversion.py                      # coatnet_5, 64 ranks (~8 GB in)
    python benchmarks/universal_conversion.py --variant coatnet_0 --ranks 8      # a quick run
    python benchmarks/universal_conversion.py --check              # the synthetic format round-trips
    python benchmarks/universal_conversion.py --check --against-real   # + a real DeepSpeed save

The checkpoint is synthetic but in DeepSpeed 0.19.8's real ZeRO-3 on-disk format, as a training
checkpoint of this repository holds it (`<folder>/train_state.json`, `<folder>/ds/
zero_pp_rank_R_mp_rank_00_model_states.pt` and `bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt`):
the variant's real parameter names and shapes (built on the meta device), the two parameter groups
`pipeline.engine.param_groups` makes (decay / no decay), DeepSpeed's sub-groups, each rank's flat
fp32 partition and Adam moments with ZeRO-3's per-parameter partition padding, the step, the
optimizer's hyperparameters, ds_config and ds_version. Every value is a deterministic function of
(parameter, state, element), so the universal output can be checked element by element.

`--check` writes small checkpoints (default coatnet_pico at 4 and 7 ranks: 7 leaves some ranks
holding nothing of the small vectors), converts each both ways and checks that every parameter's
fp32 / exp_avg / exp_avg_sq in the universal output equals the values written, and that the files
are the same set. `--against-real` also saves a real 2-rank ZeRO-3 engine (gloo, one AdamW step)
and checks that the synthetic files have the same structure (keys, types, tensor shapes, dtypes,
parameter shapes and order), and converts it.

Everything goes into one temp dir `<--tmp>/coatnet-bench-*`, removed at the end (also on an error
or Ctrl-C). Disk: input 12 bytes/parameter, output the same again plus DeepSpeed's temporary
fragments (the same again) at the peak.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STATES = ("fp32", "exp_avg", "exp_avg_sq")
SUB_GROUP_SIZE = 10 ** 9          # DeepSpeed's default zero_optimization.sub_group_size (our profiles keep it)
NUM_CLASSES, IMG_SIZE, STEP = 1000, 224, 1


# ---------------------------------------------------------------------------------------------
# The synthetic checkpoint
# ---------------------------------------------------------------------------------------------

def train_config(variant: str, world: int, use_gpu: bool = True):
    from pipeline.config import Config

    return Config.model_validate({"model": {"variant": variant, "img_size": IMG_SIZE, "num_classes": NUM_CLASSES},
                                  "train": {"steps": 10, "global_batch": world, "micro_batch": 1},
                                  "scaling": {"num_workers": world, "use_gpu": use_gpu}})


class Layout:
    """What the ZeRO-3 engine of ``variant`` would save: parameter names and shapes per sub-group
    (DeepSpeed's ``fp16_groups``: each optimizer group cut at ``sub_group_size`` partition elements),
    the optimizer's hyperparameters per group, the module state dict's keys."""

    def __init__(self, variant: str, world: int, cfg) -> None:
        import torch

        import models
        from pipeline.engine import build_optimizer, param_groups

        model = models.create_model(variant, num_classes=NUM_CLASSES, img_size=IMG_SIZE, device="meta")
        names = {p: n for n, p in model.named_parameters()}
        self.world = world
        self.sub_groups: list[OrderedDict] = []          # name -> torch.Size, in flat order
        self.group_of: list[int] = []                    # sub-group -> optimizer group
        for g, group in enumerate(param_groups(model, cfg.train.weight_decay)):
            current: OrderedDict = OrderedDict()
            size = 0
            total = sum(math.ceil(p.numel() / world) for p in group["params"])
            for p in group["params"]:
                current[names[p]] = p.shape
                size += math.ceil(p.numel() / world)
                if total > SUB_GROUP_SIZE and (size >= SUB_GROUP_SIZE or p is group["params"][-1]):
                    self.sub_groups.append(current)
                    self.group_of.append(g)
                    current, size = OrderedDict(), 0
            if current:
                self.sub_groups.append(current)
                self.group_of.append(g)
        self.hyper = [{k: v for k, v in pg.items() if k != "params"}
                      for pg in build_optimizer(cfg, model).state_dict()["param_groups"]]
        params = set(names.values())
        persistent = set()
        for mod_name, mod in model.named_modules():
            for b_name, _ in mod.named_buffers(recurse=False):
                if b_name not in mod._non_persistent_buffers_set:
                    persistent.add(f"{mod_name}.{b_name}" if mod_name else b_name)
        self.buffer_names = [n for n, _ in model.named_buffers() if n in persistent]
        self.module_keys = []                            # (key, is_param, shape, dtype)
        for key, t in model.state_dict(keep_vars=True).items():
            is_param = key in params
            dtype = torch.bfloat16 if (is_param or t.is_floating_point()) else t.dtype
            self.module_keys.append((key, is_param, t.shape, dtype))
        self.numel = sum(s.numel() for g in self.sub_groups for s in g.values())

    def names(self):
        return [n for g in self.sub_groups for n in g]


def values(seed: int, start: int, end: int):
    """Elements [start, end) of a parameter's state ``seed``: distinct per state, parameter and
    position (100003 is prime), exactly reproducible in float32."""
    import torch

    i = torch.arange(start, end, dtype=torch.int64)
    v = ((i * 7919 + seed * 104729) % 100003).to(torch.float64) / 100003 - 0.5
    return v.to(torch.float32)


def expected(layout: Layout, name: str, state: str):
    """The whole (flat) tensor written for a parameter's state."""
    k = layout.names().index(name)
    n = next(g[name] for g in layout.sub_groups if name in g).numel()
    return values(3 * k + STATES.index(state), 0, n)


def rank_files(layout: Layout, rank: int, ds_config: dict):
    """(model states, optimizer states) of one rank, as DeepSpeed 0.19.8's ZeRO-3 engine saves them
    (``engine._save_checkpoint`` / ``DeepSpeedZeroOptimizer_Stage3._rigid_state_dict``)."""
    import deepspeed
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    W = layout.world
    k = 0
    flats = {s: [] for s in STATES}
    for group in layout.sub_groups:
        part_total = sum(math.ceil(shape.numel() / W) for shape in group.values())
        bufs = {s: torch.zeros(part_total, dtype=torch.float32) for s in STATES}
        offset = 0
        for shape in group.values():
            n = shape.numel()
            part = math.ceil(n / W)
            start, end = min(n, rank * part), min(n, (rank + 1) * part)     # the rest is padding
            for si, s in enumerate(STATES):
                bufs[s][offset:offset + end - start] = values(3 * k + si, start, end)
            offset += part
            k += 1
        for s in STATES:
            flats[s].append(bufs[s])
    for t in flats["fp32"]:
        t.requires_grad_(True)                   # the optimizer's master partitions are leaves
    state = {i: {"step": torch.tensor(float(STEP)), "exp_avg": flats["exp_avg"][i],
                 "exp_avg_sq": flats["exp_avg_sq"][i]} for i in range(len(layout.sub_groups))}
    param_groups = [dict(h, params=[i for i, g in enumerate(layout.group_of) if g == gi])
                    for gi, h in enumerate(layout.hyper)]
    optim = {"optimizer_state_dict": {
        "zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False,
        "overflow": False, "partition_count": W,
        "optimizer_state_dict": {"state": state, "param_groups": param_groups},
        "fp32_flat_groups": flats["fp32"]},
        "ds_config": ds_config, "ds_version": deepspeed.__version__}
    module = OrderedDict()
    for key, is_param, shape, dtype in layout.module_keys:
        module[key] = torch.empty(0, dtype=dtype) if is_param else torch.zeros(shape, dtype=dtype)
    batch = ds_config["train_batch_size"]
    model = {"module": module, "buffer_names": list(layout.buffer_names), "optimizer": None,
             "param_shapes": [OrderedDict(g) for g in layout.sub_groups], "frozen_param_shapes": OrderedDict(),
             "shared_params": {}, "frozen_param_fragments": OrderedDict(), "lr_scheduler": None,
             "data_sampler": None, "random_ltd": None, "skipped_steps": 0, "global_steps": STEP,
             "global_samples": STEP * batch, "dp_world_size": W, "mp_world_size": 1,
             "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
             "ds_config": ds_config, "ds_version": deepspeed.__version__}
    return model, optim


def write_checkpoint(folder: str, layout: Layout, cfg, say=print) -> dict:
    """A training checkpoint folder of ``layout.world`` ranks; returns its size and file count."""
    import torch

    from pipeline.checkpoint import DS_TAG, STATE_FILE, TrainState
    from pipeline.engine import deepspeed_config

    ds_config = deepspeed_config(cfg)
    ds = os.path.join(folder, DS_TAG)
    os.makedirs(ds)
    t0 = time.time()
    for r in range(layout.world):
        model, optim = rank_files(layout, r, ds_config)
        torch.save(model, os.path.join(ds, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
        torch.save(optim, os.path.join(ds, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        del model, optim
        if r % 8 == 7 or r == layout.world - 1:
            say(f"  wrote rank {r + 1}/{layout.world} ({time.time() - t0:.0f} s)")
    state = TrainState(step=STEP, samples_seen=STEP * cfg.train.global_batch, total_steps=cfg.train.steps,
                       loader={}, config=cfg.model_dump(mode="json"), world_size=layout.world)
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        f.write(state.to_json())
    size, files = tree_usage(folder)
    return {"bytes": size, "files": files}


# ---------------------------------------------------------------------------------------------
# Disk: a folder's usage, sampled in a background thread
# ---------------------------------------------------------------------------------------------

def tree_usage(path: str) -> tuple[int, int]:
    """(bytes allocated on disk, files) under ``path``; symlinks are not followed."""
    total, files, stack = 0, 0, [path]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue                                     # removed meanwhile
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        total += e.stat(follow_symlinks=False).st_blocks * 512
                        files += 1
                except OSError:
                    pass
    return total, files


class DiskSampler:
    """Peak usage of a folder (walked, at most ~10% of one core) and of its file system
    (``statvfs`` used blocks above the start, every 0.1 s) while a conversion runs."""

    def __init__(self, path: str) -> None:
        self.path, self.peak, self.peak_files, self.peak_fs = path, 0, 0, 0
        self._fs0 = self._fs_used()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _fs_used(self) -> int:
        st = os.statvfs(os.path.dirname(self.path))
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _run(self) -> None:
        next_walk = 0.0
        while not self._done.is_set():
            self.peak_fs = max(self.peak_fs, self._fs_used() - self._fs0)
            now = time.monotonic()
            if now >= next_walk:
                size, files = tree_usage(self.path)
                took = time.monotonic() - now
                if size > self.peak:
                    self.peak, self.peak_files = size, files
                self.peak_files = max(self.peak_files, files)
                next_walk = time.monotonic() + max(0.5, 9 * took)
            self._done.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# One conversion, in a child process (own imports, own RSS, its pool's RSS)
# ---------------------------------------------------------------------------------------------

def _convert(mode: str, ckpt: str, out: str, workers: int) -> None:
    import deepspeed.checkpoint.ds_to_universal as dsu

    from pipeline import checkpoint

    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper
    dsu._extract_zero_shard_files_stage3 = timed("extract", dsu._extract_zero_shard_files_stage3)
    dsu._merge_zero3_slice_files = timed("merge", dsu._merge_zero3_slice_files)
    t0 = time.perf_counter()
    if mode == "ours":
        checkpoint.to_universal(ckpt, out, workers=workers or None)
        extract_w = workers or max(1, os.cpu_count() or 1)
        merge_w = max(1, extract_w // 2)
    else:                                  # DeepSpeed's converter, 1 extract and 1 merge worker
        import contextlib
        import io

        os.makedirs(out, exist_ok=True)
        args = argparse.Namespace(input_folder=os.path.join(ckpt, checkpoint.DS_TAG),
                                  output_folder=os.path.join(out, checkpoint.UNIVERSAL_TAG),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=False)
        with contextlib.redirect_stdout(io.StringIO()):
            dsu.main(args)
        extract_w = merge_w = 1
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "wall_s": wall, "extract_s": phases.get("extract", 0.0),
                      "merge_s": phases.get("merge", 0.0), "extract_workers": extract_w,
                      "merge_workers": merge_w,
                      "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


_CHILD: list[subprocess.Popen] = []


def run_conversion(mode: str, ckpt: str, out: str, workers: int, sample: bool = True) -> dict:
    """One conversion in a fresh process, the input's pages dropped from the page cache first (both
    runs read it cold), the output folder's disk use sampled meanwhile."""
    sync_and_evict(ckpt)
    cmd = [sys.executable, os.path.abspath(__file__), "--_convert", mode, ckpt, out, str(workers or 0)]
    os.makedirs(out)                     # sampled from the start (to_universal recreates it)
    sampler = DiskSampler(out)
    with sampler:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={**os.environ, "PYTHONPATH": ROOT})
        _CHILD.append(p)
        stdout, stderr = p.communicate()
        _CHILD.remove(p)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} conversion failed ({p.returncode}):\n{stderr[-4000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["out_bytes"], res["out_files"] = tree_usage(out)
    res.update(peak_bytes=sampler.peak, peak_files=sampler.peak_files, peak_fs_bytes=sampler.peak_fs)
    return res


def sync_and_evict(folder: str) -> None:
    """Write back what is dirty, then drop ``folder``'s files from the page cache (our own files,
    ``posix_fadvise(DONTNEED)``; nothing system-wide)."""
    os.sync()
    for d, _, fs in os.walk(folder):
        for f in fs:
            path = os.path.join(d, f)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# --check: the values survive the round trip; --against-real: the files look like DeepSpeed's
# ---------------------------------------------------------------------------------------------

def verify_universal(out: str, layout: Layout) -> int:
    """Every parameter's three states in ``out``'s universal folder equal what was written;
    returns the number of tensors compared."""
    import torch

    from pipeline.checkpoint import UNIVERSAL_TAG

    zero = os.path.join(out, UNIVERSAL_TAG, "zero")
    found = sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))
    names = layout.names()
    assert found == sorted(names), f"parameters: {set(found) ^ set(names)}"
    n = 0
    for name in names:
        for s in STATES:
            got = torch.load(os.path.join(zero, name, f"{s}.pt"), map_location="cpu", weights_only=False)
            want = expected(layout, name, s)
            assert torch.is_tensor(got) and got.dtype == torch.float32, (name, s, type(got))
            assert got.numel() == want.numel(), (name, s, tuple(got.shape), want.numel())
            assert torch.equal(got.detach().reshape(-1), want), f"{name}/{s}: values differ"
            n += 1
    for r in range(layout.world):
        assert os.path.isfile(os.path.join(out, UNIVERSAL_TAG, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
    assert os.path.isfile(os.path.join(zero, "optimizer_state.pt"))
    return n


def _listing(out: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)


def check(args, work: str) -> None:
    variant = args.variant if args.variant_given else "coatnet_pico"
    ranks = [args.ranks] if args.ranks_given else [4, 7]
    for W in ranks:
        cfg = train_config(variant, W)
        layout = Layout(variant, W, cfg)
        ckpt = os.path.join(work, f"check-{variant}-{W}")
        info = write_checkpoint(ckpt, layout, cfg, say=lambda *_: None)
        listings = []
        for mode in ("ours", "deepspeed-1x1"):
            out = os.path.join(work, f"check-{variant}-{W}-{mode}")
            res = run_conversion(mode, ckpt, out, args.workers)
            n = verify_universal(out, layout)
            listings.append(_listing(out))
            print(f"check {variant} at {W} ranks, {mode} ({res['extract_workers']} extract / "
                  f"{res['merge_workers']} merge workers): {len(layout.names())} parameters x 3 states = {n} "
                  f"tensors equal to the values written ({layout.numel:,} elements, input "
                  f"{info['bytes'] / 2**20:.1f} MiB in {info['files']} files)")
            shutil.rmtree(out)
        assert listings[0] == listings[1], set(listings[0]) ^ set(listings[1])
        print(f"check {variant} at {W} ranks: both conversions wrote the same {len(listings[0])} files")
        shutil.rmtree(ckpt)
    if args.against_real:
        against_real(work)


def _real_rank(rank: int, world: int, port: int, variant: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    import torch

    import models
    from pipeline.engine import build_optimizer, deepspeed_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = train_config(variant, world, use_gpu=False)
    ds = deepspeed_config(cfg)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = models.create_model(variant, num_classes=NUM_CLASSES, img_size=IMG_SIZE)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model), config=ds)
    x = torch.randn(1, 3, IMG_SIZE, IMG_SIZE, dtype=torch.bfloat16)
    loss = torch.nn.functional.cross_entropy(engine(x).float(), torch.tensor([rank]))
    engine.backward(loss)
    engine.step()                          # the optimizer's state exists after a step
    engine.save_checkpoint(out, tag="ds")


def structure(x, path: str = "") -> list[tuple[str, str]]:
    """What of a loaded checkpoint object must match between a real save and ours, as (path,
    description) pairs: keys and their order, types, tensor shapes / dtypes / requires_grad,
    parameter shapes, strings and numbers (not tensor values)."""
    import enum

    import torch

    if torch.is_tensor(x):
        return [(path, f"tensor {tuple(x.shape)} {x.dtype} requires_grad={x.requires_grad}")]
    if isinstance(x, torch.Size):
        return [(path, f"Size{tuple(x)}")]
    if isinstance(x, dict):
        out = [(path, f"{type(x).__name__} keys={list(x)}")]
        for k, v in x.items():
            out += structure(v, f"{path}/{k}")
        return out
    if isinstance(x, (list, tuple)):
        out = [(path, f"{type(x).__name__} len={len(x)}")]
        for i, v in enumerate(x):
            out += structure(v, f"{path}[{i}]")
        return out
    if isinstance(x, (str, int, float, bool, type(None), enum.Enum)):
        return [(path, f"{type(x).__name__} {x!r}")]
    return [(path, type(x).__name__)] + structure(vars(x), f"{path}.")


def against_real(work: str, variant: str = "coatnet_pico", world: int = 2) -> None:
    import torch
    import torch.multiprocessing as mp

    from pipeline.checkpoint import DS_TAG, STATE_FILE, TrainState

    real = os.path.join(work, "real")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_real_rank, args=(r, world, port, variant, real)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    with open(os.path.join(real, STATE_FILE), "w") as f:
        f.write(TrainState(step=STEP, samples_seen=world, total_steps=10, loader={}, config={},
                           world_size=world).to_json())
    cfg = train_config(variant, world, use_gpu=False)
    layout = Layout(variant, world, cfg)
    ours = os.path.join(work, "synthetic")
    write_checkpoint(ours, layout, cfg, say=lambda *_: None)
    compared = 0
    for name in sorted(os.listdir(os.path.join(real, DS_TAG))):
        a = torch.load(os.path.join(real, DS_TAG, name), map_location="cpu", weights_only=False)
        b = torch.load(os.path.join(ours, DS_TAG, name), map_location="cpu", weights_only=False)
        sa, sb = structure(a), structure(b)
        if sa != sb:
            i = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
            raise AssertionError(f"{name}: the synthetic file differs from DeepSpeed's save at entry {i}:\n"
                                 f"  real: {sa[i] if i < len(sa) else None}\n  ours: {sb[i] if i < len(sb) else None}")
        compared += 1
    assert compared == 2 * world and sorted(os.listdir(os.path.join(ours, DS_TAG))) == sorted(
        os.listdir(os.path.join(real, DS_TAG)))
    res = run_conversion("ours", real, os.path.join(work, "real-universal"), 0)
    syn = run_conversion("ours", ours, os.path.join(work, "synthetic-universal"), 0)
    verify_universal(os.path.join(work, "synthetic-universal"), layout)
    la, lb = _listing(os.path.join(work, "real-universal")), _listing(os.path.join(work, "synthetic-universal"))
    assert la == lb, set(la) ^ set(lb)
    print(f"against a real save ({variant}, {world} gloo ranks, one AdamW step, {time.time() - t0:.0f} s): "
          f"all {compared} files have DeepSpeed's structure (keys, types, shapes, dtypes, parameter order, "
          f"config); both convert to the same {len(la)} universal files "
          f"({res['wall_s']:.1f} / {syn['wall_s']:.1f} s)")


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------

def measure(args, work: str) -> None:
    cfg = train_config(args.variant, args.ranks)
    layout = Layout(args.variant, args.ranks, cfg)
    n_params = len(layout.names())
    print(f"{args.variant}: {layout.numel / 1e9:.3f} B parameters in {n_params} tensors, "
          f"{len(layout.sub_groups)} sub-groups; {args.ranks} ranks; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    ckpt = os.path.join(work, "checkpoint")
    t0 = time.time()
    info = write_checkpoint(ckpt, layout, cfg)
    print(f"input: {info['bytes'] / 2**30:.2f} GiB in {info['files']} files, written in {time.time() - t0:.0f} s")
    rows = []
    modes = ["ours"] + ([] if args.skip_baseline else ["deepspeed-1x1"])
    for mode in modes:
        out = os.path.join(work, f"out-{mode}")
        r = run_conversion(mode, ckpt, out, args.workers)
        if args.verify:
            verify_universal(out, layout)
            r["verified"] = True
        rows.append(r)
        print(f"  {mode}: {r['wall_s']:.1f} s (load average {os.getloadavg()[0]:.2f})")
        shutil.rmtree(out)
    fragments = args.ranks * n_params * len(STATES)
    gib = 2 ** 30
    base = rows[-1]
    print(f"\n{args.variant}, {layout.numel / 1e9:.3f} B parameters ({n_params} tensors), {args.ranks} ranks: "
          f"input {info['bytes'] / gib:.2f} GiB in {info['files']} files; DeepSpeed writes "
          f"{fragments:,} fragment files (ranks x tensors x 3 states) to its temp folder, then "
          f"{n_params * len(STATES):,} merged ones; input read cold (evicted from the page cache) each run\n")
    print("| conversion | extract / merge workers | wall s | extract s | merge s | other s | output GiB "
          "| peak output folder GiB (files) | peak file system use GiB | largest process RSS MB "
          "| wall / DeepSpeed 1x1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        other = r["wall_s"] - r["extract_s"] - r["merge_s"]
        label = "ours (`to_universal`)" if r["mode"] == "ours" else "DeepSpeed `ds_to_universal.main`, 1 x 1"
        ratio = f"{r['wall_s'] / base['wall_s']:.2f}" if base["mode"] != "ours" else "-"
        print(f"| {label} | {r['extract_workers']} / {r['merge_workers']} | {r['wall_s']:.1f} | "
              f"{r['extract_s']:.1f} | {r['merge_s']:.1f} | {other:.1f} | {r['out_bytes'] / gib:.2f} | "
              f"{r['peak_bytes'] / gib:.2f} ({r['peak_files']:,}) | {r['peak_fs_bytes'] / gib:.2f} | "
              f"{max(r['rss_self_mb'], r['rss_worker_mb']):.0f} | {ratio} |")
    node = info["bytes"] + max(r["peak_bytes"] for r in rows)
    print(f"\nnode-local disk at the peak: input {info['bytes'] / gib:.2f} GiB + output folder "
          f"{max(r['peak_bytes'] for r in rows) / gib:.2f} GiB = {node / gib:.2f} GiB "
          f"({node / info['bytes']:.1f}x the input); load average at the end {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default=None, help="model variant (default coatnet_5; --check: coatnet_pico)")
    ap.add_argument("--ranks", type=int, default=None,
                    help="ranks (world size) of the checkpoint (default 64; --check: 4 and 7)")
    ap.add_argument("--workers", type=int, default=0,
                    help="to_universal's workers (default: its own default, os.cpu_count())")
    ap.add_argument("--skip-baseline", action="store_true", help="only ours (no DeepSpeed 1x1 run)")
    ap.add_argument("--verify", action="store_true", help="also check the output's values (slow at coatnet_5)")
    ap.add_argument("--check", action="store_true", help="validate the synthetic format (small, round trip)")
    ap.add_argument("--against-real", action="store_true",
                    help="with --check: also compare with a real 2-rank DeepSpeed save (~1-3 min)")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="parent of the coatnet-bench-* work dir")
    ap.add_argument("--_convert", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._convert:
        mode, ckpt, out, workers = args._convert
        _convert(mode, ckpt, out, int(workers))
        return
    args.variant_given, args.ranks_given = args.variant is not None, args.ranks is not None
    args.variant = args.variant or "coatnet_5"
    args.ranks = args.ranks or 64

    work = tempfile.mkdtemp(prefix="coatnet-bench-", dir=args.tmp)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)      # also when started with SIGINT ignored (nohup, &)
    try:
        if args.check:
            check(args, work)
        else:
            measure(args, work)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)    # let the clean-up finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for p in _CHILD:                       # a conversion still running: its whole session
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
