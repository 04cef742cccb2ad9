"""Fine-tuning stage: start from a pretrained model, train again at a new resolution / label set.

    summary, source = run_finetune(cfg, "3f2a...e1")            # a pretraining MLflow run id
    run_finetune(cfg, "models:/coatnet-demo@champion")           # a registered version (or /3)
    run_finetune(cfg, "runs/demo")                               # a Ray run / checkpoint folder, local or s3://

What happens (the training itself is the pretraining machinery, ``pipeline.launch.run`` with
``stage="finetune"``):

1. ``resolve_source``: the reference becomes one fp32 state dict plus what it is (variant,
   resolution, classes). ZeRO-3 checkpoints are consolidated (``checkpoint.consolidate``); MLflow
   runs give their ``weights/`` artifact (safetensors); registered models come through
   ``registry.load_model``.
2. ``stage_init``: checked against the fine-tuning config on the driver BEFORE any worker starts
   (a meta-device model: no memory): same variant, every body tensor present with a fitting shape
   after the relative-position tables are resized (``models.resize_state_dict``, bilinear); a head
   whose class count differs is re-initialised. Errors are ``FinetuneError`` naming the tensors.
   The weights are written next to the run (``<storage>/<name>/init/``, shared storage so
   every worker of a cluster can read them) and become ``init.from_checkpoint``.
3. ``launch.run(stage="finetune", extra_tags=...)`` trains; its MLflow run carries the lineage
   (``coatnet.source``, ``coatnet.parent_run`` = the pretraining run, ``coatnet.source_checkpoint``,
   ``coatnet.source_weights``; ``mlflow.parentRunId`` inside a workflow).
   The same ``storage.name`` resumes an interrupted fine-tuning from its last checkpoint.
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

from pipeline import checkpoint
from pipeline.checkpoint import IncompatibleWeights
from pipeline.errors import PipelineError


class FinetuneError(PipelineError):
    """A fine-tuning source that cannot be found, read or fitted to the configured model."""


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class SourceModel:
    """A pretrained model resolved from a reference: fp32 weights plus what they are."""

    kind: str                          # run | registry | checkpoint | weights | mlflow-model
    ref: str                           # as the user gave it
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    variant: str | None
    img_size: int | None
    num_classes: int | None
    class_names: list[str] | None = None
    parent_run_id: str | None = None   # the MLflow run that produced the weights
    model_version: str | None = None   # name/version for registry sources
    checkpoint: str | None = None      # the checkpoint folder the weights came from

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("state_dict")
        return d


# --------------------------------------------------------------------------------------------
# 1. Resolving the source reference
# --------------------------------------------------------------------------------------------

def resolve_source(ref: str, *, tracking_uri: str | None = None, ema: bool = True) -> SourceModel:
    """An MLflow run id, ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``, ``runs:/ID/...``, or a
    folder/URL (a Ray run folder, one checkpoint folder, a weights folder or file, an MLflow
    model) or a ``.pt`` file -> SourceModel. FinetuneError (or RegistryError for a bad model URI)
    with a one-line reason otherwise."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if ref.startswith("models:/"):
        return _from_registry(ref)
    if ref.startswith("runs:/"):
        ref = ref[len("runs:/"):].split("/", 1)[0]
    if RUN_ID.match(ref) and not os.path.exists(ref):
        return _from_run(ref, ema=ema)
    return _from_path(ref)


def _from_registry(uri: str) -> SourceModel:
    from pipeline.registry import load_model

    model, meta = load_model(uri)
    return SourceModel("registry", uri, checkpoint.to_fp32(model), meta["variant"], int(meta["img_size"][0]),
                       int(meta["num_classes"]), list(meta["class_names"]), meta.get("run_id"),
                       f"{meta.get('name')}/{meta.get('version')}" if meta.get("version") else None)


def _from_run(run_id: str, *, ema: bool = True) -> SourceModel:
    """A run's logged weights: its EMA model (``weights_ema/``) when it has one and ``ema``, else
    ``weights/``, else its final checkpoint consolidated."""
    import mlflow

    from pipeline.registry import check_run

    run = check_run(run_id)
    tags = run.data.tags
    variant = tags.get("coatnet.variant")
    img = int(tags["coatnet.img_size"]) if tags.get("coatnet.img_size") else None
    ncls = int(tags["coatnet.num_classes"]) if tags.get("coatnet.num_classes") else None
    tmp = tempfile.mkdtemp(prefix="ft-src-")
    try:
        try:
            names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
            which = checkpoint.EMA_WEIGHTS_DIR if ema and checkpoint.EMA_WEIGHTS_DIR in names else checkpoint.WEIGHTS_DIR
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=which, dst_path=tmp)
            sd = _load_weights(path)
            ck = tags.get("coatnet.checkpoint")
        except Exception:  # noqa: BLE001 - no weights artifact: fall back to the run's checkpoint
            ck = tags.get("coatnet.checkpoint")
            if not ck:
                status = run.info.status
                raise FinetuneError(f"MLflow run {run_id} has no weights/ artifact and no "
                                    f"coatnet.checkpoint tag (status {status}: did it finish?)") from None
            src = _from_path(ck)
            sd = src.state_dict
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SourceModel("run", run_id, sd, variant, img, ncls, None, run_id, None, ck)


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        sd = checkpoint.load_weights(path)
    except Exception as e:  # noqa: BLE001 - unpickling refused, truncated file...
        raise FinetuneError(f"{path} is not a plain fp32 state dict: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FinetuneError(f"{path} is not a state dict of tensors")
    return sd


def _checkpoint_dirs(fs, path: str) -> list[str]:
    return sorted(p for p in fs.glob(f"{path.rstrip('/')}/checkpoint_*") if fs.isdir(p))


def _from_path(ref: str) -> SourceModel:
    """A local or fsspec path: .pt file, MLflow model folder, checkpoint folder or Ray run folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(ref)
    proto = ref.split("://", 1)[0] + "://" if "://" in ref else ""
    full = lambda p: proto + p if proto and not p.startswith(proto) else p  # noqa: E731
    if not fs.exists(path):
        raise FinetuneError(f"source {ref!r}: no such run id, model URI, folder or file")
    if fs.isfile(path):
        return SourceModel("weights", ref, _load_weights(ref), None, None, None)
    if fs.exists(f"{path}/MLmodel"):
        from pipeline.registry import load_model

        model, meta = load_model(ref)
        return SourceModel("mlflow-model", ref, checkpoint.to_fp32(model), meta["variant"], int(meta["img_size"][0]),
                           int(meta["num_classes"]), list(meta["class_names"]))
    ck_dir = path
    if not fs.exists(f"{path}/{checkpoint.STATE_FILE}"):
        cks = _checkpoint_dirs(fs, path)
        if not cks:
            for weights in (path, f"{path}/{checkpoint.WEIGHTS_DIR}"):
                try:
                    checkpoint.weight_files(full(weights))
                except FileNotFoundError:
                    continue
                return SourceModel("weights", ref, _load_weights(full(weights)), None, None, None)
            raise FinetuneError(f"source {ref!r}: no checkpoint in this folder (expected {checkpoint.STATE_FILE} "
                                f"and ds/, checkpoint_* folders, safetensors weights or an MLflow model)")
        ck_dir = cks[-1]
    # one checkpoint folder: ZeRO-3 shards -> fp32, on this process (no process group)
    tmp = None
    try:
        if proto:
            tmp = tempfile.mkdtemp(prefix="ft-ck-")
            fs.get(ck_dir.rstrip("/") + "/", tmp, recursive=True)
            local = tmp
        else:
            local = ck_dir
        try:
            state = checkpoint.read_state(local)
        except (OSError, json.JSONDecodeError) as e:
            raise FinetuneError(f"source {ref!r}: unreadable {checkpoint.STATE_FILE}: {e}") from None
        try:
            sd = checkpoint.consolidate(local)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises assorted errors on partial folders
            raise FinetuneError(f"source {ref!r}: cannot consolidate the ZeRO checkpoint in {full(ck_dir)}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    m = state.config.get("model", {})
    return SourceModel("checkpoint", ref, sd, m.get("variant"), m.get("img_size"), m.get("num_classes"),
                       None, state.mlflow_run_id, None, full(ck_dir))


# --------------------------------------------------------------------------------------------
# 2. Checking and staging the initial weights
# --------------------------------------------------------------------------------------------

def adapt(source: SourceModel, variant: str, img_size: int, num_classes: int, *, reset_head: bool = False,
          strict: bool = True, model=None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Source weights -> (state dict for the new network, re-initialised head keys): bias tables
    resized (bilinear), a head of another class count dropped; anything else that does not fit is
    a FinetuneError naming it. ``model``: the target network (default: built on the meta device)."""
    import models

    if source.variant and source.variant != variant:
        raise FinetuneError(f"incompatible checkpoint: {source.ref} is a {source.variant}, the config builds "
                            f"a {variant} (set model.variant={source.variant})")
    model = model if model is not None else models.create_model(variant, num_classes=num_classes,
                                                                   img_size=img_size, device="meta")
    try:
        return checkpoint.adapt_state_dict(model, dict(source.state_dict), img_size=img_size,
                                           reset_head=reset_head, strict=strict)
    except (IncompatibleWeights, ValueError, KeyError, RuntimeError) as e:
        raise FinetuneError(f"incompatible checkpoint {source.ref} for {variant} @ {img_size}px: "
                            f"{str(e).splitlines()[0][:500]}") from None


def stage_init(cfg, source: SourceModel):
    """Check the source against ``cfg`` (resolved: num_classes known) and write the initial weights
    to ``<storage>/<name>/init/`` (safetensors); returns the config with ``init.from_checkpoint`` set."""
    m = cfg.model
    sd, dropped = adapt(source, m.variant, m.img_size, m.num_classes, reset_head=cfg.init.reset_head,
                        strict=cfg.init.strict)
    del sd   # checked only; the workers do the same surgery from the original weights
    url = f"{cfg.storage.storage_path.rstrip('/')}/{cfg.storage.name}/init"
    checkpoint.save_weights(source.state_dict, url)
    cfg = cfg.model_copy(deep=True)
    cfg.init.from_checkpoint = url
    return cfg, dropped


# --------------------------------------------------------------------------------------------
# 3. The stage
# --------------------------------------------------------------------------------------------

def lineage_tags(source: SourceModel) -> dict[str, str]:
    tags = {"coatnet.source": source.ref, "coatnet.source_kind": source.kind}
    if source.parent_run_id:
        tags["coatnet.parent_run"] = source.parent_run_id
    if source.checkpoint:
        tags["coatnet.source_checkpoint"] = source.checkpoint
    if source.model_version:
        tags["coatnet.source_model_version"] = source.model_version
    if source.variant:
        tags["coatnet.source_img_size"] = str(source.img_size)
    return tags


def run_finetune(cfg, ref: str | SourceModel, *, extra_tags: dict[str, str] | None = None):
    """Resolve ``ref``, check and stage the weights, create the tagged MLflow run, train with
    ``launch.run(stage="finetune")``. Returns (RunSummary, SourceModel)."""
    from pipeline import launch
    from pipeline.config import tracking_uri
    from pipeline.console import say

    # the source first: a bad reference fails in seconds, before data or storage are touched
    source = ref if isinstance(ref, SourceModel) else resolve_source(ref, tracking_uri=tracking_uri(cfg))
    rcfg, _ = launch.prepare(cfg)      # resolves paths, tracking URI, num_classes from the data
    rcfg, dropped = stage_init(rcfg, source)
    if dropped:
        say(f"fine-tune: re-initialising {len(dropped)} head tensors ({source.num_classes} -> "
            f"{rcfg.model.num_classes} classes)")
    # lineage on the stage's MLflow run (launch.run creates or continues it by its run key)
    tags = {"coatnet.source_weights": rcfg.init.from_checkpoint, **lineage_tags(source), **(extra_tags or {})}
    summary = launch.run(rcfg, stage="finetune", extra_tags=tags)
    return summary, source
