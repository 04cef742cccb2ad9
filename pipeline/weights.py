"""fp32 model weights as files: the one safetensors writer, the reader, consolidation of ZeRO-3
shards, copying between storages, and the one check of weights against a network.

A weights location (local path or fsspec URL) is a folder holding ``model.safetensors``, or
shards plus ``model.safetensors.index.json`` (Hugging Face's layout; the index's ``weight_map``
names each tensor's file), or a single ``.safetensors`` file; a legacy ``.pt`` state dict is still
read with ``torch.load(weights_only=True)``. Nothing is ever unpickled.

    write_weights(url, state_dict.items())                  # any (name, tensor) stream, sharded
    consolidate_to(checkpoint_folder, out)                  # ZeRO-3 shards -> fp32 files, streamed
    sd = load_weights(url); shapes = weight_shapes(url)     # whole state dict; meta tensors only
    WeightReader(url).read(name, start, stop)               # a tensor's element range: one ranged read
    copy_weights(src, dest)                                 # file by file, any two storages

Every writer here holds at most one output shard (``max_shard_bytes``) in memory: a coatnet_7 is
never whole on a driver.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from pipeline.errors import PipelineError

WEIGHTS_DIR = "weights"                 # a run's consolidated weights (folder name in storage and MLflow)
EMA_WEIGHTS_DIR = "weights_ema"         # the same for the EMA model (train.ema_decay)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 512 << 20


class IncompatibleWeights(PipelineError, ValueError):
    """Weights that do not fit a network (another variant, resolution or label set)."""


def to_fp32(model_or_state_dict) -> dict[str, torch.Tensor]:
    """The fp32, contiguous, CPU form of a module's or a state dict's tensors (integers kept)."""
    sd = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    return {k: _fp32(v) for k, v in sd.items()}


def _fp32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.to("cpu", torch.float32) if t.is_floating_point() else t.cpu()).contiguous()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_weights(url: str, tensors: Iterable[tuple[str, torch.Tensor]], *,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Write a stream of (name, tensor) pairs as fp32 safetensors into the folder ``url`` (local
    path or fsspec URL): ``model.safetensors`` when it fits one shard, else ``model-0000i.safetensors``
    shards and ``model.safetensors.index.json``. Tensors are consumed one at a time, so a caller can
    produce them lazily (gathered ZeRO-3 parameters, DeepSpeed's lazy consolidation); at most one
    shard is held. Returns ``url``."""
    import fsspec
    from safetensors.torch import save

    fs, folder = fsspec.core.url_to_fs(url)
    folder = folder.rstrip("/")
    fs.makedirs(folder, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    files = 0

    def flush(name: str) -> None:
        with fs.open(f"{folder}/{name}", "wb") as f:
            f.write(save(shard, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, tensor in tensors:
        tensor = _fp32(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            files += 1
            flush(f"model-{files:05d}.safetensors")
            size = 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    if files == 0:                   # everything fit in one file
        flush(SAFETENSORS_FILE)
        return url
    files += 1
    flush(f"model-{files:05d}.safetensors")
    with fs.open(f"{folder}/{SAFETENSORS_INDEX}", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return url


def consolidate_to(checkpoint_folder: str, out: str, *, tag: str = "ds",
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Stream the ZeRO-3 shards of a local checkpoint folder (``<folder>/<tag>/``) into fp32 weights
    at ``out``: DeepSpeed's converter in lazy mode (memory-mapped shard files, each tensor made when
    written) feeding ``write_weights``. No process group needed. Returns ``out``."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        lazy = get_fp32_state_dict_from_zero_checkpoint(checkpoint_folder, tag=tag, lazy_mode=True)
        return write_weights(out, ((name, t.contiguous()) for name, t in lazy.items()),
                             max_shard_bytes=max_shard_bytes)


def consolidate(checkpoint_folder: str, *, tag: str = "ds") -> dict[str, torch.Tensor]:
    """The whole fp32 state dict from a ZeRO checkpoint folder (small models, tests)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return to_fp32(get_fp32_state_dict_from_zero_checkpoint(checkpoint_folder, tag=tag))


# --------------------------------------------------------------------------------------------
# Reading and copying
# --------------------------------------------------------------------------------------------

def weight_files(url: str) -> list[str]:
    """The files holding the weights at ``url``, as URLs of the same form (a plain path stays a
    path): a .safetensors or legacy .pt file, or a folder's model.safetensors or indexed shards."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        return [url]
    base = url.rstrip("/")
    if fs.exists(f"{path.rstrip('/')}/{SAFETENSORS_INDEX}"):
        with fs.open(f"{path.rstrip('/')}/{SAFETENSORS_INDEX}", "r") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [f"{base}/{name}" for name in shards]
    if fs.exists(f"{path.rstrip('/')}/{SAFETENSORS_FILE}"):
        return [f"{base}/{SAFETENSORS_FILE}"]
    raise FileNotFoundError(f"no weights at {url} (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or a .pt file)")


def load_weights(url: str) -> dict[str, torch.Tensor]:
    """The fp32 state dict from ``weight_files(url)``."""
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
    """Meta tensors (names, shapes, dtypes, no data) of the weights at ``url``, from the
    safetensors headers alone (8 bytes plus the JSON header of each file): a driver checks a 10 GB
    model against a network without reading it. A legacy .pt file is read whole."""
    return WeightReader(url).shapes()


class WeightReader:
    """Single tensors, or a flat range of a tensor's elements, read from the weights at ``url``
    without reading anything else: each safetensors file's header is read once, then a range is one
    ranged read of its bytes (``fs.cat_ranges``: HTTP range requests on object storage, made
    together). A ZeRO-3 rank reads only the elements of its partitions this way
    (``engine.load_init_weights``). ``bytes_read`` counts the tensor bytes fetched. A legacy .pt file
    has no offsets: it is loaded whole once (small, old models only).

        reader = WeightReader(url)
        reader.shapes()                      # {name: meta tensor}
        reader.read("stem.conv1.weight", 0, 4096)    # elements [0, 4096) of the flattened tensor
        reader.read_many([(name, 0, None), ...])     # many ranges, fetched together"""

    def __init__(self, url: str) -> None:
        import fsspec

        self.bytes_read = 0
        self._where: dict[str, tuple[Any, str, int, torch.dtype, torch.Size]] = {}
        self._loaded: dict[str, torch.Tensor] = {}       # legacy .pt files
        for file in weight_files(url):
            fs, path = fsspec.core.url_to_fs(file)
            if not file.endswith(".safetensors"):
                with fs.open(path, "rb") as f:
                    self._loaded.update(torch.load(f, map_location="cpu", weights_only=True))
                continue
            with fs.open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    begin = 8 + size + info["data_offsets"][0]
                    self._where[name] = (fs, path, begin, _SAFETENSORS_DTYPES[info["dtype"]],
                                         torch.Size(info["shape"]))

    def shapes(self) -> dict[str, torch.Tensor]:
        out = {name: torch.empty(shape, dtype=dtype, device="meta")
               for name, (_, _, _, dtype, shape) in self._where.items()}
        out.update({name: t.to("meta") for name, t in self._loaded.items()})
        return out

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor ``name``, 1-D, in its stored dtype."""
        return self.read_many([(name, start, stop)])[0]

    def read_many(self, ranges: Sequence[tuple[str, int, int | None]]) -> list[torch.Tensor]:
        """``read`` for many (name, start, stop) at once: the ranges of one file system are fetched
        together (``fs.cat_ranges``: concurrent requests on object storage, where one tensor after
        another would pay a round trip each)."""
        out: list[torch.Tensor | None] = [None] * len(ranges)
        batches: dict[int, tuple[Any, list[tuple[int, str, int, int, torch.dtype]]]] = {}
        for i, (name, start, stop) in enumerate(ranges):
            if name in self._loaded:
                out[i] = self._loaded[name].flatten()[start:stop].clone()
                continue
            fs, path, begin, dtype, shape = self._where[name]
            stop = shape.numel() if stop is None else min(stop, shape.numel())
            if stop <= start:
                out[i] = torch.empty(0, dtype=dtype)
                continue
            itemsize = torch.empty((), dtype=dtype).element_size()
            batches.setdefault(id(fs), (fs, []))[1].append(
                (i, path, begin + start * itemsize, begin + stop * itemsize, dtype))
        for fs, items in batches.values():
            data = fs.cat_ranges([p for _, p, _, _, _ in items], [b for _, _, b, _, _ in items],
                                 [e for _, _, _, e, _ in items], on_error="raise")
            for (i, _, _, _, dtype), raw in zip(items, data):
                self.bytes_read += len(raw)
                out[i] = torch.frombuffer(bytearray(raw), dtype=dtype)
        return out


def _arrow_fs(url: str):
    """(pyarrow filesystem, path) for any fsspec URL or local path."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    fs, path = fsspec.core.url_to_fs(url)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return LocalFileSystem(), path
    return PyFileSystem(FSSpecHandler(fs)), path


def _legacy(files: list[str]) -> bool:
    """``weight_files`` of a legacy .pt state dict (converted to safetensors when copied)."""
    return len(files) == 1 and not files[0].endswith(".safetensors")


def _named_files(src: str, files: list[str]) -> list[tuple[str, str]]:
    """(file, its name in a weights folder) for the safetensors ``files`` of ``src``: shards keep
    their names and bring their index; one file, whatever its name, is model.safetensors."""
    if len(files) > 1:
        index = f"{src.rstrip('/')}/{SAFETENSORS_INDEX}"
        return [(f, f.rsplit("/", 1)[-1]) for f in (index, *files)]
    return [(files[0], SAFETENSORS_FILE)]


def copy_weights(src: str, dest: str) -> str:
    """Copy the weights at ``src`` into the folder ``dest`` (local paths or fsspec URLs, any pair)
    with ``pyarrow.fs.copy_files``: streamed file by file, the model never in memory whole. A legacy
    .pt file becomes ``model.safetensors`` (that one is loaded whole). Returns ``dest``."""
    import pyarrow.fs as pafs

    files = weight_files(src)
    if _legacy(files):
        return write_weights(dest, load_weights(files[0]).items())
    dest_fs, dest_path = _arrow_fs(dest)
    dest_fs.create_dir(dest_path, recursive=True)
    for file, name in _named_files(src, files):
        src_fs, src_path = _arrow_fs(file)
        pafs.copy_files(src_path, f"{dest_path.rstrip('/')}/{name}", source_filesystem=src_fs,
                        destination_filesystem=dest_fs)
    return dest


ARTIFACTS_DESTINATION_ENV = "COATNET_MLFLOW_ARTIFACTS_DESTINATION"   # the server's --artifacts-destination


def artifact_url(artifact_uri: str) -> str | None:
    """Where the MLflow artifact location ``artifact_uri`` lies in storage this process writes itself
    (a local path or fsspec URL), or None when only MLflow's artifact repository reaches it. Direct:
    a local path or ``file://``; ``s3://`` when MLflow's S3 client and fsspec's talk to the same
    endpoint (``MLFLOW_S3_ENDPOINT_URL`` unset or equal to ``AWS_ENDPOINT_URL``); ``gs://`` with gcsfs
    installed; the tracking server's proxied ``mlflow-artifacts:/P`` when ``$COATNET_MLFLOW_ARTIFACTS_DESTINATION``
    names the server's ``--artifacts-destination`` D (the server keeps P at ``D/P``). Anything else
    (the proxy without that variable, Databricks, Azure) is reached through the repository only."""
    import importlib.util
    import os
    from urllib.parse import urlparse

    scheme = urlparse(artifact_uri).scheme
    if scheme in ("", "file"):
        return artifact_uri
    if scheme == "s3":
        theirs = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "").rstrip("/")
        same = not theirs or theirs == os.environ.get("AWS_ENDPOINT_URL", "").rstrip("/")
        return artifact_uri if same else None
    if scheme == "gs":
        return artifact_uri if importlib.util.find_spec("gcsfs") else None
    destination = os.environ.get(ARTIFACTS_DESTINATION_ENV, "").rstrip("/")
    if scheme == "mlflow-artifacts" and destination and not destination.startswith("mlflow-artifacts:"):
        return artifact_url(f"{destination}/{urlparse(artifact_uri).path.lstrip('/')}")
    return None


def copy_to_artifacts(src: str, artifact_uri: str, *, tracking_uri: str | None = None) -> str:
    """Copy the weights at ``src`` (local or fsspec URL) into the MLflow artifact location
    ``artifact_uri`` (a run's ``artifact_uri`` or a logged model's ``artifact_location``, plus the
    folder) without this process holding or staging the model. Where ``artifact_url`` finds the
    storage: ``copy_weights``, file by file, streamed (S3 to the same S3 is a server-side copy), no
    local disk. Otherwise through MLflow's artifact repository (the tracking server's proxy), one
    file at a time, each spooled to a temporary file and removed once uploaded: one shard on disk at
    a time (at most ``MAX_SHARD_BYTES`` as ``write_weights`` cuts them; a legacy .pt is converted
    whole first). Returns where they went."""
    import os
    import shutil
    import tempfile

    import fsspec

    direct = artifact_url(artifact_uri)
    if direct is not None:
        return copy_weights(src, direct)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="coatnet-upload-") as tmp:
        files = weight_files(src)
        if _legacy(files):
            src = write_weights(os.path.join(tmp, "converted"), load_weights(files[0]).items())
            files = weight_files(src)
        for file, name in _named_files(src, files):
            local = os.path.join(tmp, name)
            with fsspec.open(file, "rb") as f, open(local, "wb") as out:
                shutil.copyfileobj(f, out, 8 << 20)
            repo.log_artifact(local)
            os.remove(local)
    return artifact_uri


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
    out: dict[str, Any] = {k: v for k, v in sd.items() if k not in dropped}
    if strict:
        check_compatible(out, model, what="init checkpoint (does not fit the model)", ignore=sorted(head))
    else:
        dropped += [k for k, v in out.items() if k in own and own[k].shape != v.shape]
        out = {k: v for k, v in out.items() if k not in dropped}
    return out, dropped
