"""The training checkpoint: what every rank saves, how a run resumes from it (at the same or
another world size), and which checkpoint of a run is the one to resume from. Weights as files
(consolidation, safetensors) are ``pipeline.weights``.

Layout of one checkpoint folder (a Ray Train checkpoint under ``<storage_path>/<name>/``)::

    train_state.json               TrainState: step, samples seen, loader cursor, resolved config...
    ds/                            engine.save_checkpoint(dir, tag="ds")
      zero_pp_rank_{r}_mp_rank_00_model_states.pt         (one per rank: module metadata, buffers)
      bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt    (one per rank: fp32 master + Adam moments)
    ema/rank_{r}.pt                (only with train.ema_decay: the rank's fp32 EMA partition)
    weights_ema/                   (final checkpoint, with train.ema_decay: the whole EMA model, safetensors)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.errors import PipelineError

DS_TAG = "ds"
STATE_FILE = "train_state.json"

# --------------------------------------------------------------------------------------------
# The train state saved with every checkpoint
# --------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """What a resumed worker needs besides the DeepSpeed shards. Written by rank 0 as JSON."""

    FORMAT = 2      # 1: the first build's untyped dict (no format, no world_size)

    step: int                          # optimizer steps done
    samples_seen: int
    total_steps: int
    loader: dict[str, Any]             # StreamingLoader.state_dict(): the data cursor
    config: dict[str, Any]             # resolved config, credentials scrubbed
    label_type: str = "single"
    skipped_samples: int = 0           # summed over ranks
    mlflow_run_id: str | None = None
    world_size: int | None = None      # workers that wrote it (None: unknown, format 1)
    format: int = field(default=FORMAT)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        fmt = int(d.get("format", 1))
        if fmt > cls.FORMAT:
            raise PipelineError(f"{STATE_FILE} has format {fmt}, newer than this code ({cls.FORMAT})")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{**{k: v for k, v in d.items() if k in known}, "format": cls.FORMAT})


def read_state(directory: str) -> TrainState:
    with open(os.path.join(directory, STATE_FILE)) as f:
        return TrainState.from_dict(json.load(f))


# --------------------------------------------------------------------------------------------
# Save and resume (inside the workers: every rank calls these)
# --------------------------------------------------------------------------------------------

def staging_prefix(run_key: str, rank: int) -> str:
    """Local folders of a rank's checkpoints before upload: ``<tmp>/coatnet-ckpt-<name>-<hash>-r<rank>-*``."""
    import hashlib

    name = run_key.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(run_key.encode()).hexdigest()[:8]
    return os.path.join(tempfile.gettempdir(), f"coatnet-ckpt-{name}-{digest}-r{rank}-")


def save(engine, *, rank: int, state: TrainState, run_key: str, ema: list[torch.Tensor] | None = None) -> str:
    """Write this rank's part of a checkpoint into a new local staging folder and return it; the
    caller hands it to ``ray.train.report``, which uploads it and deletes it."""
    prefix = staging_prefix(run_key, rank)
    directory = tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix))
    engine.save_checkpoint(directory, tag=DS_TAG)
    if ema is not None:
        os.makedirs(os.path.join(directory, "ema"), exist_ok=True)
        torch.save(ema, os.path.join(directory, "ema", f"rank_{rank}.pt"))
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            f.write(state.to_json())
    return directory


UNIVERSAL_TAG = "universal"


def to_universal(directory: str, out: str | None = None, *, world_size: int | None = None,
                 workers: int | None = None) -> str:
    """Convert the ZeRO-3 shards of a checkpoint folder into DeepSpeed's universal format (one
    file per parameter: fp32 weights and Adam moments, not tied to a world size) in the local
    folder ``out`` (default: a new temporary one), returned. Only the files of ranks below
    ``world_size`` (default: the train state's) are read - DeepSpeed's converter takes every
    ``*_states.pt`` it finds and its degree from the highest rank, so stale files of another save
    must not be in its view. ``workers`` extract processes (default: one per CPU this process may
    use, at most one per rank file), half as many merge processes.

    The converter runs as a process of its own: its pools fork, and a fork of a training process
    whose torch CPU thread pool has run hangs in the children (OpenMP's barrier). An engine built
    with ``{"checkpoint": {"load_universal": true}}`` then loads it at any world size
    (``load(..., universal=folder)``)."""
    import subprocess
    import sys

    world_size = world_size or read_state(directory).world_size
    if out is None:
        out = tempfile.mkdtemp(prefix="coatnet-universal-")
    else:
        shutil.rmtree(out, ignore_errors=True)          # what a killed conversion left
        os.makedirs(out)
    view = os.path.join(out, "input")                   # this save's ranks only, as links
    os.makedirs(view)
    ranks = set()
    for name in os.listdir(os.path.join(directory, DS_TAG)):
        rank = _rank_of(name)
        if world_size is None or rank is None or rank < world_size:
            os.symlink(os.path.abspath(os.path.join(directory, DS_TAG, name)), os.path.join(view, name))
            ranks.add(rank)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cpus, len(ranks - {None}) or 1))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", view,
           "--output_folder", os.path.join(out, UNIVERSAL_TAG), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"DeepSpeed's universal conversion of {directory} failed:\n{done.stderr[-3000:]}")
    finally:
        shutil.rmtree(view, ignore_errors=True)
    return out


def _rank_of(file_name: str) -> int | None:
    """The data-parallel rank a ZeRO file belongs to (``..._zero_pp_rank_<r>_...``), else None."""
    m = re.search(r"zero_pp_rank_(\d+)_", file_name)
    return int(m.group(1)) if m else None


def node_universal_dir(run_key: str, step: int) -> str:
    """The node-local folder where a resharding resume puts the universal checkpoint of ``step``:
    named by run, node and step, so that every rank of a node finds the one its first rank wrote
    (and no two nodes write one folder when their temp dir is shared), and a conversion a kill
    interrupted is overwritten by the next."""
    import hashlib
    import socket

    digest = hashlib.sha1(run_key.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"coatnet-universal-{digest}-{socket.gethostname()}-{step}")


def clear_node_leftovers(run_key: str) -> int:
    """What killed workers of this run left on this node: every rank's unfinished checkpoint staging
    folders (a run that shrank leaves the higher ranks' too) and universal conversions. Called by a
    node's first rank before any rank of the node saves. Returns how many folders were removed."""
    import glob

    stale = glob.glob(staging_prefix(run_key, 0).rsplit("-r0-", 1)[0] + "-r*")
    stale += glob.glob(node_universal_dir(run_key, 0).rsplit("-", 1)[0] + "-*")
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def clear_unfinished_saves(storage_path: str, run_name: str, *, after_step: int, timeout_s: float,
                           say=print) -> list[str]:
    """Remove the run's ``checkpoint_*`` folders of steps after ``after_step`` (the step this attempt
    resumes from): saves an earlier attempt did not finish. One save per folder - a save killed at 4
    ranks and a re-run at 2 reaching the same step would otherwise leave ranks 2-3's files beside the
    new ones. Rank 0 calls it once at start, long before any rank saves; rides out a storage outage
    like the upload does. Returns the names removed."""
    from pipeline.cluster import storage_filesystem
    from pipeline.retry import RetryPolicy, call_with_retry

    fs, root = storage_filesystem(storage_path)
    run = f"{root.rstrip('/')}/{run_name}"

    def clear() -> list[str]:
        import pyarrow.fs as pafs

        found = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
        names = sorted(i.base_name for i in found if i.type == pafs.FileType.Directory
                       and re.fullmatch(r"checkpoint_\d+", i.base_name)
                       and int(i.base_name.split("_")[1]) > after_step)
        for name in names:
            fs.delete_dir(f"{run}/{name}")
        return names
    return call_with_retry(clear, RetryPolicy(timeout_s=timeout_s, initial_delay_s=1.0, max_delay_s=30.0),
                           retry_on=lambda e: True, announce=say, service="storage",
                           doing="clearing unfinished checkpoints")


def uploader(storage_path: str, run_name: str, *, timeout_s: float, say=print):
    """A ``ray.train.report(checkpoint_upload_fn=...)``: copies a rank's checkpoint folder to
    ``<storage_path>/<run_name>/<checkpoint dir>`` as Ray's default does, but retries with backoff
    while storage is unreachable, for up to ``timeout_s``; only a longer outage fails the step."""
    import pyarrow.fs as pafs

    from pipeline.cluster import storage_filesystem
    from pipeline.retry import RetryPolicy, call_with_retry

    def upload(ckpt, dir_name: str):
        from ray.train import Checkpoint

        fs, root = storage_filesystem(storage_path)
        dest = f"{root.rstrip('/')}/{run_name}/{dir_name}"

        def copy():
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(ckpt.path, dest, source_filesystem=ckpt.filesystem, destination_filesystem=fs)
        call_with_retry(copy, RetryPolicy(timeout_s=timeout_s, initial_delay_s=1.0, max_delay_s=30.0),
                        retry_on=lambda e: True, announce=say, service="storage",
                        doing=f"uploading {dir_name}")
        return Checkpoint(path=dest, filesystem=fs)
    return upload


def load(engine, directory: str, *, rank: int, universal: str | None = None, ema: bool = False
         ) -> tuple[TrainState, list[torch.Tensor] | None]:
    """Every rank calls this on a fresh engine (ZeRO-3). ``universal``: the ``to_universal`` folder
    of ``directory`` when the world size changed. Returns (train state, this rank's EMA partitions:
    with ``ema``, the saved EMA cut to this world's partitions, else None; None also when the
    checkpoint has none)."""
    folder, tag = (universal, UNIVERSAL_TAG) if universal else (directory, DS_TAG)
    inner = engine.optimizer.optimizer
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    path, _ = engine.load_checkpoint(folder, tag=tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/{tag}")
    if universal:
        # DeepSpeed 0.19.8's ZeRO-3 universal load copies parameter group 0's hyperparameters into
        # every group (the no-decay group would be decayed) and gives every group the SAME 'step'
        # tensor (torch's Adam then advances it once per group and step). Each group gets its own
        # hyperparameters (the config's, as a fresh engine has them) and its own step back.
        for group, values in zip(inner.param_groups, hyper):
            group.update(values)
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    state = read_state(directory)
    return state, (load_ema(directory, engine, rank=rank, saved_world=state.world_size) if ema else None)


def load_ema(directory: str, engine, *, rank: int, saved_world: int | None) -> list[torch.Tensor] | None:
    """This rank's fp32 EMA partitions (``partitions()`` order) from the checkpoint's ``ema/rank_*.pt``,
    at any world size: at the saved one each rank reads its own file; at another, each parameter is
    put together from every saved rank's partition (memory-mapped, one parameter at a time) and this
    rank's slice of the new partitioning is cut out. None when the checkpoint has no EMA."""
    import torch.distributed as dist

    ema_dir = os.path.join(directory, "ema")
    if not os.path.exists(os.path.join(ema_dir, "rank_0.pt")):
        return None
    if saved_world in (None, dist.get_world_size()):
        return torch.load(os.path.join(ema_dir, f"rank_{rank}.pt"), weights_only=True)
    saved = [torch.load(os.path.join(ema_dir, f"rank_{r}.pt"), weights_only=True, mmap=True)
             for r in range(saved_world)]
    out = []
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_tensor")]
    for i, p in enumerate(params):
        full = torch.cat([parts[i] for parts in saved])[:p.ds_numel]
        size = p.ds_tensor.numel()
        mine = torch.zeros(size, dtype=torch.float32)
        piece = full[rank * size:(rank + 1) * size]
        mine[:piece.numel()] = piece
        out.append(mine.to(p.ds_tensor.device))
    return out


# --------------------------------------------------------------------------------------------
# Finding checkpoints of a run
# --------------------------------------------------------------------------------------------

def registered_checkpoint(run_dir: str) -> str | None:
    """The checkpoint Ray's snapshot file names: Ray registers a checkpoint only once every rank has
    uploaded its part, and resumes a re-run from it by itself. None without a snapshot (then a
    re-run resumes from ``latest_complete``: ``launch.run``)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    try:
        with fs.open(f"{path.rstrip('/')}/checkpoint_manager_snapshot.json", "rb") as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
    except FileNotFoundError:
        return None   # no snapshot: a new run, or folders copied from elsewhere
    except ValueError:
        return None   # being rewritten by Ray
    name = latest.get("checkpoint_dir_name")
    return f"{run_dir.rstrip('/')}/{name}" if name else None


def latest_complete(run_dir: str) -> str | None:
    """The newest ``checkpoint_*`` folder that ``is_complete`` accepts (a save that a kill
    interrupted leaves a folder with some ranks' files, never chosen), or None. Without Ray's
    snapshot (folders copied from elsewhere) Ray would start from step 0: the driver hands this
    one to the workers instead (``TrainTask.resume_from``)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    try:
        complete = sorted(p for p in fs.glob(f"{path.rstrip('/')}/checkpoint_*") if is_complete(fs, p))
    except OSError:
        return None
    return f"{run_dir.rstrip('/')}/{complete[-1].rstrip('/').rsplit('/', 1)[-1]}" if complete else None


def is_complete(fs, path: str) -> bool:
    """A checkpoint folder (on filesystem ``fs``) holds its train state and, for every rank of the
    world size the state names, the rank's ZeRO model and optimizer files."""
    try:
        with fs.open(f"{path.rstrip('/')}/{STATE_FILE}", "rb") as f:
            world = json.loads(f.read()).get("world_size")
        if not world:          # format 1 states do not say: the state file is all we can check
            return True
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{path.rstrip('/')}/{DS_TAG}", detail=False)}
    except (OSError, ValueError):
        return False
    return all(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" in names
               and any(n.endswith(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for n in names)
               for r in range(int(world)))
