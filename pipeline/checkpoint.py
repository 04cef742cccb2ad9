"""One checkpoint format: a DeepSpeed ZeRO-3 checkpoint (every rank's shards) plus a small JSON
``train_state.json`` (step, loader position, resolved config, MLflow run id), inside a Ray Train
checkpoint folder under ``RunConfig(storage_path, name)``.

Layout of one checkpoint folder::

    train_state.json               {"step", "samples_seen", "loader", "config", "mlflow_run_id", ...}
    ds/                            engine.save_checkpoint(dir, tag="ds")
      zero_pp_rank_{r}_mp_rank_00_model_states.pt         (one per rank: module metadata, buffers)
      bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt    (one per rank: fp32 master + Adam moments)
    ema/rank_{r}.pt                (only with train.ema_decay: the rank's fp32 EMA partition)

``consolidate(dir)`` turns the shards into one fp32 state dict (any single process, no process
group); ``save_weights``/``load_weights`` write and read it as a plain tensor dict that loads
with ``torch.load(weights_only=True)`` into ``models.create_model``.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

DS_TAG = "ds"
STATE_FILE = "train_state.json"
WEIGHTS_FILE = "model.pt"


def save(engine, directory: str | None, *, rank: int, state: dict[str, Any],
         ema: list[torch.Tensor] | None = None) -> str:
    """Every rank calls this (collective). Returns the folder to hand to ``ray.train.report``."""
    directory = directory or tempfile.mkdtemp(prefix="ckpt-")
    engine.save_checkpoint(directory, tag=DS_TAG)
    if ema is not None:
        os.makedirs(os.path.join(directory, "ema"), exist_ok=True)
        torch.save(ema, os.path.join(directory, "ema", f"rank_{rank}.pt"))
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
    return directory


def read_state(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def load(engine, directory: str, *, rank: int) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """Every rank calls this on a fresh engine (ZeRO-3). Returns (train_state, ema partition)."""
    path, _ = engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{DS_TAG}")
    ema_path = os.path.join(directory, "ema", f"rank_{rank}.pt")
    ema = torch.load(ema_path, weights_only=True) if os.path.exists(ema_path) else None
    return read_state(directory), ema


def consolidate(directory: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of the whole model from a ZeRO checkpoint folder (no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(directory, tag=DS_TAG)
    return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in sd.items()}


def save_weights(state_dict: dict[str, torch.Tensor], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path


def load_weights(url: str) -> dict[str, torch.Tensor]:
    """An fp32 state dict from a local path or fsspec URL (weights_only: no code is unpickled)."""
    import fsspec

    with fsspec.open(url, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def adapt_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, img_size,
                     reset_head: bool = False, strict: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fine-tuning surgery: resize relative-position tables to ``img_size`` (``models.resize_state_dict``),
    drop tensors whose shape no longer fits (the classifier when the label set changed), and all
    head tensors with ``reset_head``. Returns (state dict to load, dropped keys)."""
    import models

    sd = models.resize_state_dict(sd, img_size)
    own = model.state_dict()
    head = _head_keys(model)
    dropped = [k for k, v in sd.items()
               if k in own and (own[k].shape != v.shape or (reset_head and k in head))]
    out = {k: v for k, v in sd.items() if k not in dropped}
    if strict:
        missing = [k for k in own if k not in out and k not in head]
        unexpected = [k for k in out if k not in own]
        if missing or unexpected:
            raise ValueError(f"init checkpoint does not fit the model: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
    return out, dropped


def _head_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the final classifier: the last Linear whose out_features is num_classes."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.out_features == getattr(model, "num_classes", -1):
            name = n
    if name is None:
        return set()
    return {k for k in model.state_dict() if k.startswith(name + ".")}
