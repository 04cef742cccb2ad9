"""Batch prediction: top-k labels from a registered model for image files, folders or shards.

    rows = predict("models:/coatnet-demo@champion", ["photos/", "s3://bucket/val"])

Small inputs run in this process; large ones (or any shards) go through Ray Data:
``read_images`` / ``read_webdataset`` then ``map_batches`` with ``BatchPredictor`` actors, one
model per actor, weights shared through the object store.
"""
from __future__ import annotations

import json
from typing import Iterator, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.registry import device, load_model
from pipeline.spec import ModelSpec, preprocess, top_k
from pipeline.weights import to_fp32


class InputError(PipelineError):
    """An input to predict that does not exist or cannot be read."""


def iter_samples(val: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image bytes, label or -1) for every sample of a split, in index order, read by
    pipeline.data's shard reader (webdataset's tar parsing, checksums verified)."""
    from pipeline.data import ShardIndex, iter_shard_samples
    from pipeline.data.reader import BadSample, parse_labels

    idx = ShardIndex.load(val)
    class_index = {n: i for i, n in enumerate(idx.class_names)} if idx.label_key is not None else None
    for i in range(idx.num_shards):
        for key, img, files in iter_shard_samples(idx.shard_url(i), sha256=idx.shards.sha256_hex(i)):
            try:     # the label as the index says it is read (cls of our shards, or the key recorded)
                label = parse_labels(files, "single", idx.num_classes, idx.label_key, class_index)
            except BadSample:
                label = -1
            yield key, img, label  # type: ignore[misc]


def shard_urls(idx) -> list[str]:
    return [idx.shard_url(i) for i in range(idx.num_shards)]



IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Paths/URLs -> (image files, shard URLs). A folder holding a shard index (index.parquet or
    index.json), an index file or a .tar is read as shards; other folders are searched recursively
    for images."""
    import fsspec

    files, shards = [], []
    for item in inputs:
        fs, path = fsspec.core.url_to_fs(item)
        proto = item.split("://", 1)[0] + "://" if "://" in item else ""
        if not fs.exists(path):
            raise InputError(f"input not found: {item}")
        if path.endswith(".tar"):
            shards.append(item)
        elif path.endswith(("index.json", "index.parquet")) or (fs.isdir(path) and any(
                fs.exists(f"{path.rstrip('/')}/{name}") for name in ("index.parquet", "index.json"))):
            from pipeline.data import ShardIndex

            shards += shard_urls(ShardIndex.load(item))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_EXTS))
            files += [proto + p if proto else p for p in found]
        else:
            files.append(item)
    return files, shards


class BatchPredictor:
    """Callable class for ``Dataset.map_batches``: one model per actor, weights from the object store."""

    def __init__(self, payload, top_k: int = 5, batch_size: int = 64):
        import ray
        import torch

        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        sd, spec = payload
        self.spec = ModelSpec.from_dict(spec)
        self.model = self.spec.build()
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
        self.device = device()
        self.model.to(self.device).eval()
        self.k = top_k

    def __call__(self, batch: dict) -> dict:
        import torch

        if "image" in batch:
            images = list(batch["image"])
        else:  # webdataset rows: the first image-like column
            from pipeline.data.reader import IMAGE_EXTENSIONS

            col = next((c for c in IMAGE_EXTENSIONS if c in batch), None) or next(
                c for c in batch if c.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
            images = list(batch[col])
        ids = batch.get("path", batch.get("__key__"))
        x = preprocess(images, self.spec).to(self.device)
        with torch.inference_mode():
            rows = top_k(self.model(x), self.spec, self.k)
        return {
            "input": np.asarray([str(i) for i in ids], dtype=object),
            "label": np.asarray([r["label"] for r in rows], dtype=object),
            "class_id": np.asarray([r["class_id"] for r in rows]),
            "score": np.asarray([r["score"] for r in rows]),
            "top_k_labels": np.asarray([json.dumps(r["top_k_labels"]) for r in rows], dtype=object),
            "top_k_scores": np.asarray([json.dumps(r["top_k_scores"]) for r in rows], dtype=object),
        }


def predict(model_uri: str, inputs: Sequence[str], *, top_k_: int = 5, batch_size: int = 64,
            use_ray: bool | None = None, ray_threshold: int = 512, concurrency: int = 1) -> list[dict]:
    """Top-k labels for image files, folders or shards. Inputs above ``ray_threshold`` images (or
    any shards, when ``use_ray`` is None) go through Ray Data: read_images / read_webdataset, then
    ``map_batches`` with ``BatchPredictor`` actors. Returns one dict per image in input order."""
    import torch

    from pipeline.data import iter_shard_samples

    model, meta = load_model(model_uri)
    spec: ModelSpec = meta["spec"]
    files, shards = expand_inputs(inputs)
    if use_ray is None:
        use_ray = bool(shards) or len(files) > ray_threshold
    if not use_ray:
        rows = []
        dev = device()
        model.to(dev)
        items = [(f, f) for f in files] + [(k, img) for u in shards for k, img, _ in iter_shard_samples(u)]
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            x = preprocess([im for _, im in chunk], spec).to(dev)
            with torch.inference_mode():
                out = top_k(model(x), spec, top_k_)
            rows += [{"input": str(name), **r} for (name, _), r in zip(chunk, out)]
        return rows
    return _predict_ray(model, spec, files, shards, top_k_, batch_size, concurrency)


def _pyarrow_fs(url: str):
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(url)
    if fs.protocol in ("file", ("file", "local")) or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None
    return PyFileSystem(FSSpecHandler(fs))


def _strip(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def _predict_ray(model, spec: ModelSpec, files, shards, k, batch_size, concurrency) -> list[dict]:
    import ray
    import ray.data

    from pipeline.cluster import ray_session

    with ray_session(num_cpus=None):
        return _predict_on_ray(ray, model, spec, files, shards, k, batch_size, concurrency)


def _predict_on_ray(ray, model, spec: ModelSpec, files, shards, k, batch_size, concurrency) -> list[dict]:

    sd = {key: v.numpy() for key, v in to_fp32(model).items()}
    payload = ray.put((sd, spec.to_dict()))
    parts = []
    kw = dict(fn_constructor_kwargs={"payload": payload, "top_k": k}, batch_size=batch_size,
              concurrency=concurrency, batch_format="numpy")
    if files:
        fsys = _pyarrow_fs(files[0])
        ds = ray.data.read_images([_strip(f) if fsys else f for f in files], include_paths=True,
                                  mode="RGB", filesystem=fsys)
        parts.append(ds.map_batches(BatchPredictor, **kw))
    if shards:
        fsys = _pyarrow_fs(shards[0])
        ds = ray.data.read_webdataset([_strip(u) if fsys else u for u in shards], filesystem=fsys,
                                      decoder=None)
        parts.append(ds.map_batches(BatchPredictor, **kw))
    rows = []
    for ds in parts:
        for r in ds.iter_rows():
            rows.append({"input": r["input"], "label": r["label"], "class_id": int(r["class_id"]),
                         "score": float(r["score"]), "top_k_labels": json.loads(r["top_k_labels"]),
                         "top_k_scores": json.loads(r["top_k_scores"])})
    return rows
