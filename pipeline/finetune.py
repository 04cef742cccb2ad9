"""Fine-tuning stage: start from a pretrained model, train again at a new resolution / label set.

    summary, source = run_finetune(cfg, "3f2a...e1")            # a pretraining MLflow run id
    run_finetune(cfg, "models:/coatnet-demo@champion")           # a registered version (or /3)
    run_finetune(cfg, "runs/demo")                               # a Ray run / checkpoint folder, local or s3://

What happens (the training itself is the pretraining machinery, ``pipeline.launch.run`` with
``stage="finetune"``):

1. ``resolve_source``: the reference becomes fp32 safetensors files plus what they are (variant,
   resolution, classes). ZeRO-3 checkpoints are streamed into files (``weights.consolidate_to``,
   one output shard in memory at a time); MLflow runs give their ``weights/`` artifact and
   registered models their files, read where they lie when the driver reaches the artifact store
   (``weights.artifact_url``; a run's also from its final checkpoint), downloaded only otherwise
   (``registry.fetch_model``). Nothing is loaded whole on the driver.
2. ``stage_init``: checked against the fine-tuning config on the driver BEFORE any worker starts,
   on the meta device from the files' headers (no weight is read): same variant, every body tensor
   present with a fitting shape after the relative-position tables are resized
   (``models.resize_state_dict``); a head whose class count differs is re-initialised. Errors are
   ``FinetuneError`` naming the tensors. The files are copied next to the run
   (``<storage>/<name>/init/``, shared storage so every worker of a cluster can read them) and
   become ``init.from_checkpoint``; the workers do the surgery on the real tensors.
3. ``launch.run(stage="finetune", extra_tags=...)`` trains; its MLflow run carries the lineage
   (``coatnet.source``, ``coatnet.parent_run`` = the pretraining run, ``coatnet.source_checkpoint``,
   ``coatnet.source_weights``; ``mlflow.parentRunId`` inside a workflow).
   The same ``storage.name`` resumes an interrupted fine-tuning from its last checkpoint.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from pipeline import checkpoint
from pipeline.errors import PipelineError
from pipeline.weights import (EMA_WEIGHTS_DIR, WEIGHTS_DIR, IncompatibleWeights, adapt_state_dict, artifact_url,
                              consolidate_to, copy_weights, load_weights, weight_files, weight_shapes)


class FinetuneError(PipelineError):
    """A fine-tuning source that cannot be found, read or fitted to the configured model."""


RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SCRATCH_PREFIX = "coatnet-source-"     # <tmp>/coatnet-source-<pid>-*: one per resolved source


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # another user's process: alive
        pass
    return True


def new_scratch() -> str:
    """A temporary folder for a source's downloaded or consolidated files, named by this process's
    pid. Folders whose process is gone (a driver killed before it could remove them) are removed
    first, so a killed run leaves nothing behind once the next one starts."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), SCRATCH_PREFIX + "*-*")):
        pid = d.rsplit(SCRATCH_PREFIX, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


@contextmanager
def _source_scratch() -> Iterator[str]:
    """``new_scratch()`` for a SourceModel under construction: removed if building it fails,
    owned by the SourceModel (``scratch=``) once it is returned."""
    scratch = new_scratch()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


@dataclass(kw_only=True)
class SourceModel:
    """A pretrained model resolved from a reference: where its fp32 weights are (safetensors files,
    read lazily) plus what they are. The driver checks them by ``shapes()`` (the files' headers)
    and stages them by copying files, so it never holds the model; ``load()`` reads it whole for
    the driver-side evaluation. Files it had to download or consolidate live in a temporary folder
    removed by ``close()`` (or when the object is collected)."""

    kind: str                          # run | registry | checkpoint | weights | mlflow-model
    ref: str                           # as the user gave it
    weights: str                       # a weights folder or file (pipeline.weights.weight_files), local or URL
    variant: str | None = None         # None: unknown (a bare weights file); checked by shapes alone
    preset: str | None = None          # the network's form (model.preset); None: unknown
    img_size: int | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    parent_run_id: str | None = None   # the MLflow run that produced the weights
    model_version: str | None = None   # name/version for registry sources
    checkpoint: str | None = None      # the checkpoint folder the weights came from
    scratch: str | None = field(default=None, repr=False)   # owned temporary folder, if any

    def __post_init__(self) -> None:
        if self.scratch:
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.scratch, True)

    def shapes(self) -> dict[str, torch.Tensor]:
        """Meta tensors of every weight (names, shapes, dtypes) from the safetensors headers."""
        try:
            return weight_shapes(self.weights)
        except Exception as e:  # noqa: BLE001 - truncated header, unpickling refused...
            raise FinetuneError(f"{self.ref}: unreadable weights at {self.weights}: {type(e).__name__}: {e}") from None

    def load(self) -> dict[str, torch.Tensor]:
        """The whole fp32 state dict (for driver-side evaluation; checks and staging never need it)."""
        return _load_weights(self.weights)

    def close(self) -> None:
        if self.scratch:
            self._cleanup()

    def __enter__(self) -> "SourceModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# 1. Resolving the source reference
# --------------------------------------------------------------------------------------------

def resolve_source(ref: str, *, tracking_uri: str | None = None, ema: bool = True) -> SourceModel:
    """An MLflow run id, ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``, ``runs:/ID/...``, or a
    folder/URL (a Ray run folder, one checkpoint folder, a weights folder or file, an MLflow
    model) or a ``.pt`` file -> SourceModel. FinetuneError (or RegistryError for a bad model URI)
    with a one-line reason otherwise. Nothing is loaded whole: a ZeRO-3 checkpoint is streamed
    into safetensors files (``weights.consolidate_to``), artifacts are downloaded as files."""
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


def _from_mlflow_model(kind: str, uri: str) -> SourceModel:
    """A model we logged: its files where they lie when this process reaches the artifact store
    (``registry.locate_model``), else downloaded into a scratch folder."""
    from pipeline.registry import fetch_model, locate_model

    scratch = None
    found = locate_model(uri)
    if found is not None:
        files, spec, meta = found
    else:
        with _source_scratch() as scratch:
            files, spec, meta = fetch_model(uri, dst_path=scratch)
    return SourceModel(kind=kind, ref=uri, weights=files, variant=spec.variant,
                       preset=str(spec.overrides.get("preset", "timm")), img_size=int(spec.img_size[0]),
                       num_classes=int(spec.num_classes), class_names=list(spec.class_names),
                       parent_run_id=meta.get("run_id"),
                       model_version=f"{meta['name']}/{meta['version']}" if meta.get("version") else None,
                       scratch=scratch)


def _from_registry(uri: str) -> SourceModel:
    return _from_mlflow_model("registry", uri)


def run_weights(run, which: str) -> str | None:
    """Where the run's ``which`` artifact (``weights/`` or ``weights_ema/``) can be read in place: in
    the run's artifact location when this process reaches that store (``weights.artifact_url``), else
    the same files the driver logged from, in the run's final checkpoint (tag ``coatnet.checkpoint``),
    if they are still there. None: only a download reaches them."""
    direct = artifact_url(f"{run.info.artifact_uri.rstrip('/')}/{which}")
    if direct is not None:
        return direct
    ck = run.data.tags.get("coatnet.checkpoint")
    if ck:
        try:
            weight_files(f"{ck.rstrip('/')}/{which}")
            return f"{ck.rstrip('/')}/{which}"
        except (FileNotFoundError, OSError):
            pass
    return None


def _from_run(run_id: str, *, ema: bool = True) -> SourceModel:
    """A run's logged weights: its EMA model (``weights_ema/``) when it has one and ``ema``, else
    ``weights/`` (read in place when reachable: ``run_weights``; else downloaded), else its final
    checkpoint consolidated."""
    import mlflow

    from pipeline.registry import check_run

    run = check_run(run_id)
    tags = run.data.tags
    known = dict(variant=tags.get("coatnet.variant"), preset=run.data.params.get("model.preset"),
                 img_size=int(tags["coatnet.img_size"]) if tags.get("coatnet.img_size") else None,
                 num_classes=int(tags["coatnet.num_classes"]) if tags.get("coatnet.num_classes") else None)
    ck = tags.get("coatnet.checkpoint")
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    which = EMA_WEIGHTS_DIR if ema and EMA_WEIGHTS_DIR in names else WEIGHTS_DIR
    if which in names and (in_place := run_weights(run, which)) is not None:
        return SourceModel(kind="run", ref=run_id, weights=in_place, **known, parent_run_id=run_id, checkpoint=ck)
    if which in names:
        with _source_scratch() as scratch:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=which, dst_path=scratch)
        return SourceModel(kind="run", ref=run_id, weights=path, **known, parent_run_id=run_id,
                           checkpoint=ck, scratch=scratch)
    if not ck:   # no weights artifact: the run's checkpoint
        raise FinetuneError(f"MLflow run {run_id} has no weights/ artifact and no "
                            f"coatnet.checkpoint tag (status {run.info.status}: did it finish?)")
    src = _from_path(ck)          # keeps its scratch folder; it only becomes this run's source
    src.kind, src.ref, src.parent_run_id, src.checkpoint = "run", run_id, run_id, ck
    for name, value in known.items():
        setattr(src, name, value or getattr(src, name))
    return src


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        sd = load_weights(path)
    except Exception as e:  # noqa: BLE001 - unpickling refused, truncated file...
        raise FinetuneError(f"{path} is not a plain fp32 state dict: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FinetuneError(f"{path} is not a state dict of tensors")
    return sd


def _from_path(ref: str) -> SourceModel:
    """A local or fsspec path: .pt/.safetensors file, weights folder, MLflow model folder,
    checkpoint folder or Ray run folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(ref)
    as_ref = (lambda p: fs.unstrip_protocol(p)) if "://" in ref else (lambda p: p)  # same form as ref
    if not fs.exists(path):
        raise FinetuneError(f"source {ref!r}: no such run id, model URI, folder or file")
    if fs.isfile(path):
        return SourceModel(kind="weights", ref=ref, weights=ref)
    if fs.exists(f"{path}/MLmodel"):
        return _from_mlflow_model("mlflow-model", ref)
    ck_dir = path
    if not fs.exists(f"{path}/{checkpoint.STATE_FILE}"):
        found = sorted(p for p in fs.glob(f"{path.rstrip('/')}/checkpoint_*") if fs.isdir(p))
        if not found:
            for folder in (path, f"{path}/{WEIGHTS_DIR}"):
                try:
                    weight_files(as_ref(folder))
                except FileNotFoundError:
                    continue
                return SourceModel(kind="weights", ref=ref, weights=as_ref(folder))
            raise FinetuneError(f"source {ref!r}: no checkpoint in this folder (expected {checkpoint.STATE_FILE} "
                                f"and ds/, checkpoint_* folders, safetensors weights or an MLflow model)")
        ck_dir = found[-1]
    # one checkpoint folder: ZeRO-3 shards streamed into fp32 safetensors, on this process
    with _source_scratch() as scratch:
        local = ck_dir
        if "://" in ref:
            local = os.path.join(scratch, "checkpoint")
            fs.get(ck_dir.rstrip("/") + "/", local, recursive=True)
        try:
            state = checkpoint.read_state(local)
        except (OSError, json.JSONDecodeError) as e:
            raise FinetuneError(f"source {ref!r}: unreadable {checkpoint.STATE_FILE}: {e}") from None
        consolidated = os.path.join(scratch, WEIGHTS_DIR)
        try:
            consolidate_to(local, consolidated, tag=checkpoint.DS_TAG)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises assorted errors on partial folders
            raise FinetuneError(f"source {ref!r}: cannot consolidate the ZeRO checkpoint in {as_ref(ck_dir)}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        if local != ck_dir:
            shutil.rmtree(local, ignore_errors=True)
    m = state.config.get("model", {})
    return SourceModel(kind="checkpoint", ref=ref, weights=consolidated, variant=m.get("variant"),
                       preset=m.get("preset", "timm"),
                       img_size=m.get("img_size"), num_classes=m.get("num_classes"),
                       parent_run_id=state.mlflow_run_id, checkpoint=as_ref(ck_dir), scratch=scratch)


# --------------------------------------------------------------------------------------------
# 2. Checking and staging the initial weights
# --------------------------------------------------------------------------------------------

def adapt(source: SourceModel, variant: str, img_size: int, num_classes: int, *, reset_head: bool = False,
          strict: bool = True, model=None, state_dict: dict[str, torch.Tensor] | None = None,
          architecture: dict | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Source weights -> (state dict for the new network, re-initialised head keys): bias tables
    resized (bilinear), a head of another class count dropped; anything else that does not fit is
    a FinetuneError naming it. ``model``: the target network (default: built on the meta device).
    ``state_dict``: the source's loaded weights; by default its meta tensors (``shapes()``), which
    check the fit without reading any weight. ``architecture``: ``ModelConfig.architecture()``
    (preset and form fields) of the target; a source of another preset is refused (the weights
    would load - same shapes - into a network that computes something else)."""
    import models

    architecture = dict(architecture or {})
    preset = architecture.get("preset", "timm")
    if source.preset and source.preset != preset:
        raise FinetuneError(f"incompatible checkpoint: {source.ref} was trained as the {source.preset!r} form, "
                            f"the config builds {preset!r} (set model.preset={source.preset})")

    if source.variant and source.variant != variant:
        raise FinetuneError(f"incompatible checkpoint: {source.ref} is a {source.variant}, the config builds "
                            f"a {variant} (set model.variant={source.variant})")
    model = model if model is not None else models.create_model(variant, num_classes=num_classes,
                                                                   img_size=img_size, device="meta",
                                                                   **architecture)
    sd = dict(state_dict) if state_dict is not None else source.shapes()
    try:
        return adapt_state_dict(model, sd, img_size=img_size, reset_head=reset_head, strict=strict)
    except (IncompatibleWeights, ValueError, KeyError, RuntimeError) as e:
        raise FinetuneError(f"incompatible checkpoint {source.ref} for {variant} @ {img_size}px: "
                            f"{str(e).splitlines()[0][:500]}") from None


def stage_init(cfg, source: SourceModel):
    """Check the source against ``cfg`` (resolved: num_classes known) on the meta device, then copy
    its weight files to ``<storage>/<name>/init/`` (shared storage, so every worker of a cluster
    reads them; the workers do the surgery); returns the config with ``init.from_checkpoint`` set."""
    m = cfg.model
    _, dropped = adapt(source, m.variant, m.img_size, m.num_classes, reset_head=cfg.init.reset_head,
                       strict=cfg.init.strict, architecture=m.architecture())
    url = f"{cfg.storage.storage_path.rstrip('/')}/{cfg.storage.name}/init"
    copy_weights(source.weights, url)
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
    if source.img_size:
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
