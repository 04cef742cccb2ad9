"""Everything about weights: the training checkpoint (save, resume), consolidation of ZeRO-3 shards
to fp32, the fp32 state-dict form, and the one compatibility check of weights against a network.

Layout of one checkpoint folder (a Ray Train checkpoint under ``<storage_path>/<name>/``)::

    train_state.json               TrainState: step, samples seen, loader cursor, resolved config...
    ds/                            engine.save_checkpoint(dir, tag="ds")
      zero_pp_rank_{r}_mp_rank_00_model_states.pt         (one per rank: module metadata, buffers)
      bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt    (one per rank: fp32 master + Adam moments)
    ema/rank_{r}.pt                (only with train.ema_decay: the rank's fp32 EMA partition)
    weights_ema/                   (final checkpoint, with train.ema_decay: the whole EMA model, safetensors)

``consolidate_to(dir, out)`` streams the shards into fp32 safetensors files (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above ``max_shard_size``)
through DeepSpeed's converter: one output shard in memory at a time, never the whole model.
``load_weights`` reads such a folder (or a single .safetensors / legacy .pt file) into a state dict
for ``models.create_model``; ``consolidate(dir)`` returns the whole fp32 state dict (small models).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from pipeline.errors import PipelineError

DS_TAG = "ds"
STATE_FILE = "train_state.json"
WEIGHTS_DIR = "weights"                 # a folder of safetensors files (see load_weights)
EMA_WEIGHTS_DIR = "weights_ema"         # the same for the EMA model (train.ema_decay)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class IncompatibleWeights(PipelineError, ValueError):
    """Weights that do not fit a network (another variant, resolution or label set)."""


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


def clear_staging(run_key: str, rank: int) -> int:
    """Remove what a killed predecessor of this rank left before its upload finished. Returns how many."""
    import glob
    import shutil

    stale = glob.glob(staging_prefix(run_key, rank) + "*")
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


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


def to_universal(directory: str, out: str | None = None) -> str:
    """Convert the ZeRO-3 shards of a checkpoint folder into DeepSpeed's universal format (one
    file per parameter: fp32 weights and Adam moments, not tied to a world size) in the local
    folder ``out`` (default: a new temporary one), returned. An engine built with
    ``{"checkpoint": {"load_universal": true}}`` then loads it at any world size
    (``load(..., universal=folder)``)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    if out is None:
        out = tempfile.mkdtemp(prefix="coatnet-universal-")
    else:
        shutil.rmtree(out, ignore_errors=True)          # what a killed conversion left
        os.makedirs(out)
    args = argparse.Namespace(input_folder=os.path.join(directory, DS_TAG),
                              output_folder=os.path.join(out, UNIVERSAL_TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()):      # its progress bars and banners
        ds_to_universal(args)
    return out


def node_universal_dir(run_key: str, step: int) -> str:
    """The node-local folder where a resharding resume puts the universal checkpoint of ``step``:
    named by run and step, so that every rank of a node finds the one its first rank wrote, and a
    conversion a kill interrupted is overwritten by the next."""
    import hashlib

    digest = hashlib.sha1(run_key.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"coatnet-universal-{digest}-{step}")


def uploader(storage_path: str, run_name: str, *, timeout_s: float, say=print):
    """A ``ray.train.report(checkpoint_upload_fn=...)``: copies a rank's checkpoint folder to
    ``<storage_path>/<run_name>/<checkpoint dir>`` as Ray's default does, but retries with backoff
    while storage is unreachable, for up to ``timeout_s``; only a longer outage fails the step."""
    import pyarrow.fs as pafs

    from pipeline.data.storage import RetryPolicy, call_with_retry

    def upload(ckpt, dir_name: str):
        from ray.train import Checkpoint

        from pipeline.launch import storage_filesystem

        fs, root = storage_filesystem(storage_path)
        if fs is None:
            fs, root = pafs.FileSystem.from_uri(storage_path if "://" in storage_path
                                                else os.path.abspath(storage_path))
        dest = f"{root.rstrip('/')}/{run_name}/{dir_name}"
        failed = []

        def copy():
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(ckpt.path, dest, source_filesystem=ckpt.filesystem, destination_filesystem=fs)

        def first_failure(e: BaseException) -> None:
            if not failed:
                say(f"checkpoint {dir_name}: storage unreachable ({type(e).__name__}); retrying for up "
                    f"to {timeout_s:.0f} s")
            failed.append(e)
        call_with_retry(copy, RetryPolicy(timeout_s=timeout_s, initial_delay_s=1.0, max_delay_s=30.0),
                        on_retry=first_failure, retry_on=lambda e: True)
        if failed:
            say(f"checkpoint {dir_name} uploaded after storage came back")
        return Checkpoint(path=dest, filesystem=fs)
    return upload


def load(engine, directory: str, *, rank: int, universal: str | None = None
         ) -> tuple[TrainState, list[torch.Tensor] | None]:
    """Every rank calls this on a fresh engine (ZeRO-3). ``universal``: the ``to_universal`` folder
    of ``directory`` when the world size changed (the EMA, a per-rank partition, is then not
    restored). Returns (train state, EMA partition or None)."""
    folder, tag = (universal, UNIVERSAL_TAG) if universal else (directory, DS_TAG)
    path, _ = engine.load_checkpoint(folder, tag=tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/{tag}")
    if universal:
        # DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group the SAME 'step'
        # tensor; torch's Adam then advances it once per group and step (2x with our decay and
        # no-decay groups), skewing bias correction. One tensor per group, as a normal load has.
        for st in engine.optimizer.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    ema_path = os.path.join(directory, "ema", f"rank_{rank}.pt")
    ema = torch.load(ema_path, weights_only=True) if os.path.exists(ema_path) and not universal else None
    return read_state(directory), ema


# --------------------------------------------------------------------------------------------
# fp32 weights
# --------------------------------------------------------------------------------------------

def to_fp32(model_or_state_dict) -> dict[str, torch.Tensor]:
    """The fp32, contiguous, CPU form of a module's or a state dict's tensors (integers kept)."""
    sd = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in sd.items()}


def consolidate(directory: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of the whole model from a ZeRO checkpoint folder (no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return to_fp32(get_fp32_state_dict_from_zero_checkpoint(directory, tag=DS_TAG))


def consolidate_to(directory: str, out_dir: str, *, max_shard_size: str = "512MB") -> str:
    """Stream the ZeRO-3 checkpoint in ``directory`` into fp32 safetensors files in ``out_dir``
    (local) with DeepSpeed's converter: shard files are memory-mapped and one output shard at a
    time is materialised. Returns ``out_dir``."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert_zero_checkpoint_to_fp32_state_dict(directory, out_dir, max_shard_size=max_shard_size,
                                                   safe_serialization=True, tag=DS_TAG)
    return out_dir


def save_weights(state_dict: dict[str, torch.Tensor], url: str, *, max_shard_size: str = "512MB") -> str:
    """Write an fp32 state dict as safetensors into the folder ``url`` (local path or fsspec URL):
    ``model.safetensors``, or shards + ``model.safetensors.index.json`` above ``max_shard_size``
    (the layout ``consolidate_to`` writes and ``load_weights`` reads)."""
    import fsspec
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save

    sd = to_fp32(state_dict)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        with fs.open(f"{path.rstrip('/')}/{filename}", "wb") as f:
            f.write(save({k: sd[k] for k in names}, metadata={"format": "pt"}))
    if split.is_sharded:
        with fs.open(f"{path.rstrip('/')}/{SAFETENSORS_INDEX}", "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f)
    return url


def weight_files(url: str) -> list[str]:
    """The files holding the weights at ``url``: a .safetensors or legacy .pt file, or a folder with
    model.safetensors or a safetensors index and its shards."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""
    if fs.isfile(path):
        return [url]
    base = path.rstrip("/")
    if fs.exists(f"{base}/{SAFETENSORS_INDEX}"):
        with fs.open(f"{base}/{SAFETENSORS_INDEX}", "r") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [f"{proto}{base}/{name}" for name in shards]
    if fs.exists(f"{base}/{SAFETENSORS_FILE}"):
        return [f"{proto}{base}/{SAFETENSORS_FILE}"]
    raise FileNotFoundError(f"no weights at {url} (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or a .pt file)")


def load_weights(url: str) -> dict[str, torch.Tensor]:
    """An fp32 state dict from ``weight_files(url)``; safetensors (or ``torch.load(weights_only=True)``
    for a legacy .pt file): no code is ever unpickled."""
    import fsspec
    from safetensors.torch import load

    out: dict[str, torch.Tensor] = {}
    for file in weight_files(url):
        with fsspec.open(file, "rb") as f:
            out.update(load(f.read()) if file.endswith(".safetensors")
                       else torch.load(f, map_location="cpu", weights_only=True))
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def weight_shapes(url: str) -> dict[str, torch.Tensor]:
    """Meta tensors (names, shapes, dtypes, no data) of the weights at ``url``, read from the
    safetensors headers alone: 8 bytes plus the JSON header of each file, so a driver can check
    a 10 GB model against a network without reading it. A legacy .pt file is read whole."""
    import fsspec

    out: dict[str, torch.Tensor] = {}
    for file in weight_files(url):
        with fsspec.open(file, "rb") as f:
            if not file.endswith(".safetensors"):
                out.update(torch.load(f, map_location="meta", weights_only=True))
                continue
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]], device="meta")
    return out


def copy_weights(src: str, dest: str, *, chunk_bytes: int = 64 << 20) -> str:
    """Copy the weights at ``src`` into the folder ``dest`` (local paths or fsspec URLs, any pair),
    file by file in ``chunk_bytes`` pieces: the model is never in memory whole. A legacy .pt file
    becomes ``model.safetensors`` (that one is loaded whole). Returns ``dest``."""
    import fsspec

    files = weight_files(src)
    if len(files) == 1 and not files[0].endswith(".safetensors"):
        return save_weights(load_weights(files[0]), dest)
    fs, path = fsspec.core.url_to_fs(dest)
    fs.makedirs(path, exist_ok=True)
    sharded = len(files) > 1          # from an index (one file is always model.safetensors)
    names = [f.rsplit("/", 1)[-1] for f in files] if sharded else [SAFETENSORS_FILE]
    if sharded:
        index = f"{src.rstrip('/')}/{SAFETENSORS_INDEX}"
        files, names = [index, *files], [SAFETENSORS_INDEX, *names]
    for file, name in zip(files, names):
        with fsspec.open(file, "rb") as r, fs.open(f"{path.rstrip('/')}/{name}", "wb") as w:
            while chunk := r.read(chunk_bytes):
                w.write(chunk)
    return dest


# --------------------------------------------------------------------------------------------
# Weights against a network
# --------------------------------------------------------------------------------------------

def check_compatible(state_dict: dict, model: torch.nn.Module, *, what: str = "checkpoint",
                     ignore: Sequence[str] = ()) -> None:
    """IncompatibleWeights naming the first mismatches when ``state_dict`` does not fit ``model``
    (a meta-device model will do: only names and shapes are read). ``ignore``: keys, or key
    prefixes, allowed to differ or be missing (the head when it is replaced)."""
    own = model.state_dict()
    skip = lambda k: any(k == p or k.startswith(p if p.endswith(".") else p + ".") for p in ignore)  # noqa: E731
    missing = [k for k in own if k not in state_dict and not skip(k)]
    unexpected = [k for k in state_dict if k not in own and not skip(k)]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and not skip(k) and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
        raise IncompatibleWeights(f"incompatible {what}: {' / '.join(parts)} - is it another variant "
                                  f"or resolution than {getattr(model, 'img_size', '')} {type(model).__name__}?")


def head_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the final classifier: the last Linear whose out_features is num_classes."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.out_features == getattr(model, "num_classes", -1):
            name = n
    if name is None:
        return set()
    return {k for k in model.state_dict() if k.startswith(name + ".")}


def adapt_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, img_size,
                     reset_head: bool = False, strict: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fine-tuning surgery: resize relative-position tables to ``img_size`` (``models.resize_state_dict``),
    drop the head when its shape no longer fits (another label set) or with ``reset_head``; with
    ``strict`` every other tensor must fit (``check_compatible``). Returns (state dict, dropped keys)."""
    import models

    sd = models.resize_state_dict(sd, img_size)
    own = model.state_dict()
    head = head_keys(model)
    dropped = [k for k, v in sd.items()
               if k in head and k in own and (own[k].shape != v.shape or reset_head)]
    out = {k: v for k, v in sd.items() if k not in dropped}
    if strict:
        check_compatible(out, model, what="init checkpoint (does not fit the model)", ignore=sorted(head))
    else:
        dropped += [k for k, v in out.items() if k in own and own[k].shape != v.shape]
        out = {k: v for k, v in out.items() if k not in dropped}
    return out, dropped


# --------------------------------------------------------------------------------------------
# Finding checkpoints of a run
# --------------------------------------------------------------------------------------------

def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint a re-run of the Ray run at ``run_dir`` (local path or URL) resumes from:
    the one Ray's snapshot file names (Ray registers a checkpoint only once every rank has uploaded
    its part), else the newest complete ``checkpoint_*`` folder (``is_complete``: a save that a
    kill interrupted leaves a folder with some ranks' files, never chosen). None when there is none."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    proto = run_dir.split("://", 1)[0] + "://" if "://" in run_dir else ""
    try:
        with fs.open(f"{path.rstrip('/')}/checkpoint_manager_snapshot.json", "rb") as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
        if name:
            return f"{run_dir.rstrip('/')}/{name}"
    except (OSError, ValueError):
        pass   # no snapshot (new run, or copied folders): look at the folders
    try:
        cks = sorted(p for p in fs.glob(f"{path.rstrip('/')}/checkpoint_*") if is_complete(fs, p))
    except OSError:
        return None
    return (proto + cks[-1] if proto and not cks[-1].startswith(proto) else cks[-1]) if cks else None


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
