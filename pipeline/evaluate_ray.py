"""Evaluation on the cluster's workers: the driver only merges.

    result = evaluate_on_cluster(ModelRef.from_registry("models:/coatnet-3/7"), "s3://b/in1k/val",
                                 workers=8, use_gpu=True, precision="bf16", per_sample=True)

The split is cut into ``parts`` (``workers x parts_per_worker``, at most one per sample) by the
project's own reader: part ``p`` is ``StreamingLoader(val, rank=p, world_size=parts, train=False)``,
whose epoch semantics read every sample of the split in exactly one part. Ray Data hands the parts
(one row each) to ``map_batches`` with a pool of ``workers`` actors (``PartScorer``: one model per
actor, one GPU each with ``use_gpu``, built on the worker from the model's files - the driver never
loads it unless it gave the weights itself, ``ModelRef.from_model``); a part lost with its actor is
scored again by Ray Data's retry, never twice in the result. Each part returns its ``Scores`` (sums of
hits, count and loss; sigmoid outputs for mAP with multi-label data) and its per-sample top-1 hits
keyed by sample key; the driver adds them (``Scores.merge``) - the same numbers as
``evaluate_model`` in one process, and the same keys for McNemar's paired test.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import PipelineError
from pipeline.evaluate import Scores, evaluation_loader, finish, score_batches
from pipeline.placement import PlacementError, describe


def _tracking_uri() -> str:
    """This process's MLflow tracking URI as a worker can use it: a relative SQLite path made
    absolute (a worker's working directory is not the driver's)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


@dataclass
class ModelRef:
    """How a worker gets the model it scores. One of: ``uri`` (``models:/NAME/VERSION``: the
    worker fetches the registered files, ``pipeline.registry.fetch_model``), ``weights`` (a weights
    folder or file every worker can read - shared path or fsspec URL - or ``runs:/ID/path``, MLflow
    artifacts, with ``spec``), ``state`` (a state dict the driver put into the object store).
    ``adapt``: the weights are a pretrained model for the spec's variant at another resolution; the
    worker resizes the relative-position tables itself (``weights.adapt_state_dict``), so a driver
    scoring a pretrained model at the fine-tuning size never holds it (the workflow's baseline)."""

    spec: dict | None = None            # ModelSpec.to_dict(); with uri: read from the model
    uri: str | None = None
    weights: str | None = None
    state: Any = None                   # ray.ObjectRef of {name: numpy array}
    tracking_uri: str | None = None     # the registry / artifacts the worker reads
    adapt: bool = False

    @classmethod
    def from_registry(cls, uri: str) -> "ModelRef":
        return cls(uri=uri, tracking_uri=_tracking_uri())

    @classmethod
    def from_weights(cls, weights: str, spec, *, adapt: bool = False) -> "ModelRef":
        """``weights``: a folder every worker can read (made absolute when local), or ``runs:/...``."""
        if "://" not in weights and ":/" not in weights:
            weights = os.path.abspath(weights)
        return cls(spec=spec.to_dict(), weights=weights, tracking_uri=_tracking_uri(), adapt=adapt)

    @classmethod
    def from_model(cls, model_or_state_dict, spec) -> "ModelRef":
        """Weights the driver holds (e.g. a model it adapted itself): put once into the object store
        (kept as they are when this process has no Ray: scored here)."""
        import ray

        from pipeline.weights import to_fp32

        state = {k: v.numpy() for k, v in to_fp32(model_or_state_dict).items()}
        return cls(spec=spec.to_dict(), state=ray.put(state) if ray.is_initialized() else state)

    def load(self):
        """(model in eval mode on this process's device, ModelSpec): runs on the worker."""
        import torch

        from pipeline.registry import device, fetch_model
        from pipeline.spec import ModelSpec
        from pipeline.weights import adapt_state_dict, check_compatible, load_weights

        if self.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        scratch = tempfile.mkdtemp(prefix="coatnet-eval-")
        try:
            spec = ModelSpec.from_dict(self.spec) if self.spec else None
            if self.uri:
                path, spec, _ = fetch_model(self.uri, dst_path=scratch)
                sd = load_weights(path)
            elif self.weights:
                path = self.weights
                if path.startswith("runs:/"):
                    import mlflow

                    path = mlflow.artifacts.download_artifacts(artifact_uri=path, dst_path=scratch)
                sd = load_weights(path)
            else:
                import ray

                state = ray.get(self.state) if isinstance(self.state, ray.ObjectRef) else self.state
                sd = {k: torch.tensor(v) for k, v in state.items()}     # a copy: object-store arrays are read-only
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        model = spec.build()
        if self.adapt:
            sd, _ = adapt_state_dict(model, sd, img_size=spec.img_size)
        check_compatible(sd, model, what=f"weights for {spec.variant}")
        model.load_state_dict(sd)
        del sd
        return model.to(device()).eval(), spec


class PartScorer:
    """``map_batches`` callable class: one model per actor; each row a part of the split."""

    def __init__(self, ref: ModelRef, val: str, parts: int, batch_size: int, precision: str,
                 per_sample: bool, loader_workers: int) -> None:
        from pipeline.data import ShardIndex

        self.model, self.spec = ref.load()
        self.device = next(self.model.parameters()).device
        self.index = ShardIndex.load(val)           # read once per actor, not once per part
        self.val, self.parts, self.batch_size = val, parts, batch_size
        self.precision, self.per_sample, self.loader_workers = precision, per_sample, loader_workers

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out = []
        for part in batch["part"]:
            try:
                out.append(pickle.dumps(self._score(int(part))))
            except PipelineError as e:      # bad data: comes back as itself (Ray would wrap it)
                out.append(pickle.dumps({"error": e}))
        return {"part": np.asarray(batch["part"]), "result": np.asarray(out, dtype=object)}

    def _score(self, part: int) -> dict:
        start = time.perf_counter()
        loader = evaluation_loader(self.index, self.spec, batch_size=self.batch_size,
                                   num_workers=self.loader_workers, rank=int(part), world_size=self.parts)
        label_type = loader.index.label_type
        scores = Scores(label_type, keep_outputs=label_type == "multi")
        correct: dict[str, bool] = {}
        score_batches(self.model, loader, scores, self.device, precision=self.precision,
                      correct=correct)
        scores.sums = scores.sums.cpu()
        return {"scores": scores, "correct": correct if self.per_sample else None,
                "keys": len(correct), "seconds": time.perf_counter() - start,
                "node": os.uname().nodename, "pid": os.getpid()}


def _cause(e: BaseException, kind: type) -> BaseException | None:
    """The ``kind`` error (a worker's DataError...) inside Ray's wrappers, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def evaluate_on_cluster(ref: ModelRef, val: str, *, workers: int = 2, use_gpu: bool = False,
                        cpus_per_worker: float = 1, precision: str = "fp32", batch_size: int = 64,
                        per_sample: bool = False, parts_per_worker: int = 4, loader_workers: int = 0,
                        start_timeout_s: float = 600.0, stats: dict | None = None) -> dict:
    """``evaluate_model``'s result (metrics, ``num_samples``, with ``per_sample`` ``correct``) computed
    by ``workers`` Ray actors (one GPU each with ``use_gpu``, else ``cpus_per_worker`` CPUs), on the
    Ray this process has, the cluster at RAY_ADDRESS, or a private local one. Every actor starts
    before any part is handed out; actors that cannot start within ``start_timeout_s`` are a
    one-line ``PlacementError`` naming what is missing. ``stats``, when given, receives per-part
    timings (benchmarks)."""
    import ray
    import ray.data

    from pipeline.cluster import ray_session
    from pipeline.data import DataError, ShardIndex
    from pipeline.evaluate import PRECISIONS

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    index = ShardIndex.load(val)
    parts = max(1, min(workers * parts_per_worker, index.num_samples))
    label_type = index.label_type
    total = Scores(label_type, keep_outputs=label_type == "multi")
    correct: dict[str, bool] | None = {} if per_sample else None
    timings = []
    start = time.perf_counter()
    pool = min(workers, parts)
    per_worker = {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": float(cpus_per_worker)}
    with ray_session(workers * (0 if use_gpu else cpus_per_worker)):
        ctx = ray.data.DataContext.get_current()
        waited, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, max(1, int(start_timeout_s))
        ds = ray.data.from_items([{"part": p} for p in range(parts)], override_num_blocks=parts)
        ds = ds.map_batches(
            PartScorer, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=per_worker.get("GPU", 0), num_cpus=per_worker["CPU"],
            fn_constructor_kwargs=dict(ref=ref, val=val, parts=parts, batch_size=batch_size,
                                       precision=precision, per_sample=per_sample,
                                       loader_workers=loader_workers))
        done = set()
        try:
            for row in ds.iter_rows():
                part = int(row["part"])
                if part in done:          # a retried part that had already come back: once only
                    continue
                done.add(part)
                r = pickle.loads(row["result"])
                if "error" in r:
                    raise r["error"]
                total.merge(r["scores"])
                if correct is not None:
                    dup = correct.keys() & r["correct"].keys()
                    if dup:
                        raise DataError(f"evaluation data {val}: sample key {sorted(dup)[0]!r} appears in two parts")
                    correct.update(r["correct"])
                timings.append({k: r[k] for k in ("seconds", "keys", "node", "pid")})
        except Exception as e:  # noqa: BLE001 - a worker's PipelineError comes back as one line
            if _cause(e, ray.exceptions.GetTimeoutError) is not None:     # the actors never all started
                raise PlacementError(describe(per_worker, pool, start_timeout_s, what="evaluation")) from None
            cause = _cause(e, PipelineError)
            if cause is not None:
                raise cause from None
            raise
        finally:
            ctx.wait_for_min_actors_s = waited
    if len(done) != parts:
        raise DataError(f"evaluation of {val}: {parts - len(done)} of {parts} parts never came back")
    if stats is not None:
        stats.update(parts=timings, wall_s=time.perf_counter() - start, workers=workers)
    return finish(total, val, correct)


def cluster_evaluator(val: str, **options) -> Callable[[str], dict]:
    """``promote``'s evaluator on the cluster: ``evaluator("models:/NAME/VERSION")`` -> the scores
    with per-sample top-1 hits, each worker fetching the version's files itself."""
    def evaluator(uri: str) -> dict:
        return evaluate_on_cluster(ModelRef.from_registry(uri), val, per_sample=True, **options)

    return evaluator
