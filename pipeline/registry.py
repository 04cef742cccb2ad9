"""The trained model as an MLflow artifact, the model registry, evaluation and promotion.

What is logged (``log_model``): an MLflow ``python_function`` model whose artifacts are

- ``weights.pt``: the fp32 state dict (plain tensors; loaded with ``torch.load(weights_only=True)``),
- ``spec.json``: everything needed to rebuild and feed the network without the training config:
  variant name, num_classes, img_size, create_model overrides, class names, preprocessing
  (resolution, mean/std, resize rule),

plus the code of ``models`` and ``pipeline`` (``code_paths``), a signature and an input example.
Others score it with ``mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [png_bytes]}))``
(the output has ``label``, ``class_id``, ``score``, ``top_k_labels``, ``top_k_scores``); our own code
gets the PyTorch module back with ``load_model(uri) -> (model, metadata)`` (e.g. fine-tuning from
``models:/name@champion``). The weights are never pickled objects, so a logged model survives
refactoring of our classes; the spec is also stored as the MLmodel ``metadata`` so it can be read
without downloading weights (``mlflow.models.get_model_info(uri).metadata``).

Registry conventions (MLflow 3: aliases, not stages): a version is created per logged final model;
the ``champion`` alias points at the version that serves; ``promote`` moves it only when a
candidate beats the champion by a margin on the same evaluation data (or when forced, recorded in
tags). Versions are never deleted. Decisions and scores are tags on the versions (keys below).

Errors a user can cause (missing run, missing alias or version, a checkpoint of another
variant/shape) raise ``RegistryError`` with a one-line message; the jobs print it and exit 2.
"""
from __future__ import annotations

import dataclasses
import getpass
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

import mlflow
import mlflow.pyfunc

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_FORMAT = 1
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Tag keys on model versions.
TAG_DECISION = "promotion.decision"          # initial | promoted | rejected | forced
TAG_AGAINST = "promotion.against_version"    # champion version compared with ("" when none)
TAG_CAND_SCORE = "promotion.candidate_score"
TAG_CHAMP_SCORE = "promotion.champion_score"
TAG_MARGIN = "promotion.margin"
TAG_METRIC = "promotion.metric"
TAG_DATA = "promotion.data"                  # fingerprint of the evaluation data
TAG_FORCED_BY = "promotion.forced_by"
TAG_FORCE_REASON = "promotion.force_reason"
TAG_TIME = "promotion.time"
TAG_REPLACED_BY = "promotion.replaced_by"    # on a former champion
TAG_EVAL_PREFIX = "eval"                     # eval.<data fingerprint>.<metric> = score
TAG_VAL_DATA = "data.val"                    # the val index a version was trained against


class RegistryError(RuntimeError):
    """A user-facing error: bad run id, alias, version, URI or incompatible weights."""


# --------------------------------------------------------------------------------------------
# Model spec and preprocessing
# --------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """What a logged model is, and how to feed it. JSON-able; stored next to the weights."""

    variant: str
    num_classes: int
    img_size: tuple[int, int]
    overrides: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875          # eval: resize the shorter side to size / crop_pct, centre crop
    interpolation: str = "bilinear"
    label_type: str = "single"
    format: int = SPEC_FORMAT

    def __post_init__(self):
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(x) for x in self.img_size)
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise RegistryError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        if int(d.get("format", SPEC_FORMAT)) > SPEC_FORMAT:
            raise RegistryError(f"model spec format {d.get('format')} is newer than this code ({SPEC_FORMAT})")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_model(cls, model, variant: str, class_names: Sequence[str] | None = None,
                   overrides: dict | None = None, **kw) -> "ModelSpec":
        return cls(variant=variant, num_classes=int(model.num_classes), img_size=tuple(model.img_size),
                   overrides=dict(overrides or {}), class_names=list(class_names or []), **kw)

    @classmethod
    def for_data(cls, model, variant: str, index, augment=None, overrides: dict | None = None) -> "ModelSpec":
        """Spec of a model trained on ``index`` (ShardIndex) with ``augment`` (AugmentConfig)."""
        from pipeline.data import AugmentConfig

        a = augment or AugmentConfig()
        return cls.from_model(model, variant, class_names=list(index.class_names), overrides=overrides,
                              mean=tuple(a.mean), std=tuple(a.std), crop_pct=a.eval_crop_pct,
                              interpolation=a.interpolation, label_type=index.label_type)

    def build(self):
        """A freshly initialised network of this spec (weights not loaded)."""
        import models

        try:
            return models.create_model(self.variant, num_classes=self.num_classes,
                                       img_size=self.img_size, **self.overrides)
        except (ValueError, KeyError, TypeError) as e:
            raise RegistryError(f"cannot build model {self.variant!r} from its spec: {e}") from None


def spec_augment(spec: "ModelSpec"):
    """The pipeline.data AugmentConfig whose eval transform is this model's preprocessing."""
    from pipeline.data import AugmentConfig

    return AugmentConfig(eval_crop_pct=spec.crop_pct, interpolation=spec.interpolation,
                         mean=tuple(spec.mean), std=tuple(spec.std))


def to_uint8_chw(image):
    """bytes / path / PIL image / HWC array -> uint8 [3,H,W] tensor (decoded as the loader does)."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(image, (str, os.PathLike)):
        import fsspec

        with fsspec.open(str(image), "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return decode_image(torch.frombuffer(bytearray(image), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # formats torchvision cannot decode (gif, bmp, tiff): PIL
            image = Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1)


def preprocess(images: Iterable, spec: "ModelSpec"):
    """Images (encoded bytes, paths/URLs, PIL images or HWC uint8 arrays) -> float [B,3,H,W].

    Exactly the eval transform of pipeline.data (resize to size/crop_pct, centre crop, normalise)
    with the spec's settings, so served inputs see what validation saw during training.
    """
    import torch
    from pipeline.data.transforms import sample_transform

    h, w = spec.img_size
    if h != w:
        raise RegistryError(f"non-square img_size {spec.img_size} is not supported by the data transforms")
    tf = sample_transform(spec_augment(spec), h, train=False)
    return torch.stack([tf(to_uint8_chw(im)) for im in images])


def top_k(logits, spec: ModelSpec, k: int = 5) -> list[dict]:
    """Logits [B,C] -> one dict per image: label, class_id, score, top_k_labels, top_k_scores."""
    import torch

    probs = torch.sigmoid(logits) if spec.label_type == "multi" else torch.softmax(logits.float(), -1)
    k = max(1, min(int(k), probs.shape[-1]))
    scores, ids = probs.topk(k, dim=-1)
    rows = []
    for s, i in zip(scores.tolist(), ids.tolist()):
        rows.append({"label": spec.class_names[i[0]], "class_id": int(i[0]), "score": float(s[0]),
                     "top_k_labels": [spec.class_names[j] for j in i], "top_k_scores": [float(v) for v in s]})
    return rows


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Compatibility of weights with a network
# --------------------------------------------------------------------------------------------

def check_compatible(state_dict: dict, model, *, source: str = "checkpoint", ignore: Sequence[str] = ()) -> None:
    """Raise RegistryError naming the first mismatches when ``state_dict`` does not fit ``model``.

    ``ignore``: key prefixes allowed to differ or be missing (e.g. the head when it is replaced).
    """
    own = model.state_dict()
    skip = lambda k: any(k.startswith(p) for p in ignore)  # noqa: E731
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
        raise RegistryError(f"incompatible {source}: {' / '.join(parts)} - is it another variant "
                            f"or resolution than {getattr(model, 'img_size', '')} {type(model).__name__}?")


# --------------------------------------------------------------------------------------------
# The pyfunc wrapper
# --------------------------------------------------------------------------------------------

class CoAtNetPyfunc(mlflow.pyfunc.PythonModel):
    """Images in, top-k labels out. Input: a DataFrame with an ``image`` column of encoded image
    bytes (PNG/JPEG) or file paths/URLs; also accepts a list of those or an HWC uint8 array batch.
    Params: ``top_k`` (default 5)."""

    _skip_type_hint_validation = True  # we log an explicit signature; no type-hint inference

    def load_context(self, context):
        self.model, self.spec = _load_from_files(context.artifacts["weights"], context.artifacts["spec"])
        self.device = _device()
        self.model.to(self.device)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        k = int((params or {}).get("top_k", 5))
        if isinstance(model_input, pd.DataFrame):
            col = "image" if "image" in model_input.columns else model_input.columns[0]
            images = list(model_input[col])
        elif isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            images = list(model_input)
        elif isinstance(model_input, dict):
            images = list(model_input.get("image"))
        else:
            images = list(model_input)
        rows = []
        for i in range(0, len(images), 64):
            x = preprocess(images[i:i + 64], self.spec).to(self.device)
            with torch.inference_mode():
                rows += top_k(self.model(x), self.spec, k)
        return pd.DataFrame(rows, columns=["label", "class_id", "score", "top_k_labels", "top_k_scores"])


def _load_from_files(weights_path: str, spec_path: str):
    import torch

    spec = ModelSpec.from_dict(json.loads(Path(spec_path).read_text()))
    model = spec.build()
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    check_compatible(sd, model, source=f"weights for {spec.variant}")
    model.load_state_dict(sd)
    return model.eval(), spec


def _example_png(spec: ModelSpec) -> bytes:
    from PIL import Image

    h, w = spec.img_size
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def fp32_state_dict(model_or_sd) -> dict:
    import torch

    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in sd.items()}


def log_model(model_or_state_dict, spec: ModelSpec, *, name: str = "model",
              registered_model_name: str | None = None, version_tags: dict | None = None):
    """Log a model (module or fp32 state dict) as a pyfunc into the active run; optionally register.

    Returns (ModelInfo, ModelVersion | None).
    """
    import pandas as pd
    import torch
    from mlflow.models import infer_signature

    sd = fp32_state_dict(model_or_state_dict)
    net = spec.build()
    check_compatible(sd, net, source="state dict to log")
    net.load_state_dict(sd)
    net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        wpath, spath = os.path.join(tmp, WEIGHTS_FILE), os.path.join(tmp, SPEC_FILE)
        torch.save(sd, wpath)
        Path(spath).write_text(json.dumps(spec.to_dict(), indent=1))
        example = pd.DataFrame({"image": [_example_png(spec)]})
        wrapper = CoAtNetPyfunc()
        wrapper.model, wrapper.spec, wrapper.device = net, spec, torch.device("cpu")
        out = wrapper.predict(None, example)
        with warnings.catch_warnings():  # "integer columns cannot hold missing values": none here
            warnings.simplefilter("ignore", UserWarning)
            signature = infer_signature(example, out, params={"top_k": 5})
        # Models from code: MLflow stores this file, not a pickled object of ours.
        entry = os.path.join(tmp, "coatnet_pyfunc.py")
        Path(entry).write_text("import mlflow\nfrom pipeline.registry import CoAtNetPyfunc\n\n"
                               "mlflow.models.set_model(CoAtNetPyfunc())\n")
        info = mlflow.pyfunc.log_model(
            name=name, python_model=entry,
            artifacts={"weights": wpath, "spec": spath},
            code_paths=[str(REPO_ROOT / "models"), str(REPO_ROOT / "pipeline")],
            signature=signature, input_example=example,
            pip_requirements=_requirements(), metadata={"coatnet_spec": spec.to_dict()},
        )
    version = None
    if registered_model_name:
        version = register(info.model_uri, registered_model_name, tags=version_tags)
    return info, version


def _requirements() -> list[str]:
    from importlib.metadata import version

    reqs = []
    for pkg in ("torch", "numpy", "pillow", "pandas", "fsspec", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except Exception:  # noqa: BLE001 - optional extras
            pass
    return reqs


def register(model_uri: str, name: str, tags: dict | None = None):
    """Create a registry version for a logged model (the registered model is created if new)."""
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    return mv


# --------------------------------------------------------------------------------------------
# Resolving URIs and loading
# --------------------------------------------------------------------------------------------

def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def _is_missing(e: Exception) -> bool:
    code = getattr(e, "error_code", "")
    return "RESOURCE_DOES_NOT_EXIST" in str(code) or "not found" in str(e).lower() or "does not exist" in str(e).lower()


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/name@alias' -> (name, None, alias); 'models:/name/3' -> (name, '3', None)."""
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    name, _, ver = rest.rpartition("/")
    if not name or not ver:
        raise RegistryError(f"bad model URI {uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    if ver.lower() == "latest":
        return name, None, None
    return name, ver, None


def resolve_version(uri: str):
    """models:/ URI -> ModelVersion, with a clear error for a missing model, alias or version."""
    from mlflow.exceptions import MlflowException

    name, ver, alias = parse_models_uri(uri)
    c = client()
    try:
        rm = c.get_registered_model(name)
    except MlflowException as e:
        if _is_missing(e):
            raise RegistryError(f"no registered model named {name!r}") from None
        raise
    try:
        if alias is not None:
            return c.get_model_version_by_alias(name, alias)
        if ver is None:
            vs = c.search_model_versions(f"name='{name}'")
            if not vs:
                raise RegistryError(f"registered model {name!r} has no versions")
            return max(vs, key=lambda v: int(v.version))
        return c.get_model_version(name, ver)
    except MlflowException as e:
        if not _is_missing(e):
            raise
        if alias is not None:
            known = ", ".join(sorted(getattr(rm, "aliases", {}) or {})) or "none"
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (aliases: {known})") from None
        raise RegistryError(f"registered model {name!r} has no version {ver}") from None


def check_run(run_id: str):
    """The MLflow run, or RegistryError when there is none with that id."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_run(run_id)
    except MlflowException as e:
        if _is_missing(e) or "run" in str(e).lower():
            raise RegistryError(f"no MLflow run with id {run_id!r} in {mlflow.get_tracking_uri()}") from None
        raise


def _download(uri: str) -> str:
    from mlflow.exceptions import MlflowException

    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        resolve_version(uri)  # clear errors first
    elif uri.startswith("runs:/"):
        check_run(uri[len("runs:/"):].split("/", 1)[0])
    elif "://" not in uri and not uri.startswith("models:/") and not os.path.exists(uri):
        raise RegistryError(f"no model at {uri!r} (expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder)")
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as e:
        raise RegistryError(f"cannot download model {uri!r}: {e.message if hasattr(e, 'message') else e}") from None
    except OSError as e:
        raise RegistryError(f"cannot download model {uri!r}: {e}") from None


def load_model(uri: str):
    """(torch model in eval mode, metadata) from a model we logged.

    ``uri``: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, models:/m-<id>, or a
    local folder holding the MLmodel. Metadata: the spec dict plus ``spec`` (ModelSpec), ``uri``,
    and, for registry URIs, ``name``, ``version``, ``run_id``.
    """
    from mlflow.models import Model

    local = _download(uri)
    mlmodel = os.path.join(local, "MLmodel")
    if not os.path.exists(mlmodel):
        raise RegistryError(f"{uri!r} is not an MLflow model (no MLmodel file)")
    flavor = Model.load(mlmodel).flavors.get("python_function", {})
    arts = flavor.get("artifacts", {})
    if "weights" not in arts or "spec" not in arts:
        raise RegistryError(f"{uri!r} is not a CoAtNet model logged by pipeline.registry (no weights/spec artifacts)")
    path = lambda a: os.path.join(local, a["path"] if isinstance(a, dict) else a)  # noqa: E731
    model, spec = _load_from_files(path(arts["weights"]), path(arts["spec"]))
    meta = {**spec.to_dict(), "spec": spec, "uri": uri}
    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        mv = resolve_version(uri)
        meta.update(name=mv.name, version=str(mv.version), run_id=mv.run_id)
    elif uri.startswith("runs:/"):
        meta["run_id"] = uri[len("runs:/"):].split("/", 1)[0]
    return model, meta


# --------------------------------------------------------------------------------------------
# Evaluation on shards
# --------------------------------------------------------------------------------------------

def data_fingerprint(val: str) -> str:
    """A short stable id of an evaluation data set: hash of its index (shard names + checksums)."""
    from pipeline.data import ShardIndex

    try:
        idx = ShardIndex.load(val)
    except Exception as e:  # noqa: BLE001 - DataError, OSError: say what is wrong, once
        raise RegistryError(f"cannot read evaluation data {val!r}: {e}") from None
    return idx.fingerprint()[:12]


def iter_samples(val: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image bytes, label or -1) for every sample of a split, in index order."""
    from pipeline.data import ShardIndex

    for url in shard_urls(ShardIndex.load(val)):
        for key, img, files in _iter_tar(url):
            label = int(files["cls"].decode().strip()) if "cls" in files else -1
            yield key, img, label


def shard_urls(idx) -> list[str]:
    return [idx.shard_url(i) for i in range(idx.num_shards)]


def evaluate(model, spec: ModelSpec, val: str, *, batch_size: int = 64, num_workers: int = 0) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy over every sample of ``val`` (single-label),
    read by pipeline.data's StreamingLoader with the model's own eval preprocessing."""
    import torch
    import torch.nn.functional as F
    from pipeline.data import DataError, StreamingLoader

    h, _ = spec.img_size
    try:
        loader = StreamingLoader(val, batch_size=batch_size, img_size=h, train=False, num_workers=num_workers,
                                 augment=spec_augment(spec), max_skip_fraction=0.0)
    except DataError as e:
        raise RegistryError(str(e)) from None
    if loader.index.num_classes != spec.num_classes:
        raise RegistryError(f"evaluation data has {loader.index.num_classes} classes, the model {spec.num_classes}")
    device = _device()
    model = model.to(device).eval()
    n = correct1 = correct5 = 0
    loss = 0.0
    with torch.inference_mode():
        for batch in loader:
            y = batch.labels.to(device)
            logits = model(batch.images.to(device)).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[-1]), -1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(-1).sum().item()
            n += len(y)
    if n == 0:
        raise RegistryError(f"no samples in {val!r}")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss / n, "num_samples": n}


# --------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------

@dataclass
class Decision:
    action: str                      # initial | promoted | rejected | forced | already_champion | unchanged
    candidate: str
    champion_before: str | None
    champion_after: str | None
    candidate_score: float | None = None
    champion_score: float | None = None
    metric: str = "top1"
    margin: float = 0.0
    data: str = ""
    changed: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _version_score(name: str, version: str, val: str, fp: str, metric: str,
                   evaluator: Callable[[str], dict]) -> float:
    """Score of a version on data ``fp``: read from its tags when present, else evaluated and tagged."""
    c = client()
    mv = c.get_model_version(name, version)
    key = f"{TAG_EVAL_PREFIX}.{fp}.{metric}"
    if key in (mv.tags or {}):
        return float(mv.tags[key])
    scores = evaluator(f"models:/{name}/{version}")
    for m, v in scores.items():
        if isinstance(v, float):
            c.set_model_version_tag(name, version, f"{TAG_EVAL_PREFIX}.{fp}.{m}", f"{v:.6f}")
    c.set_model_version_tag(name, version, f"{TAG_EVAL_PREFIX}.{fp}.num_samples", str(scores.get("num_samples", "")))
    return float(f"{scores[metric]:.6f}")


def promote(name: str, candidate: str | None = None, *, val: str | None = None, alias: str = "champion",
            margin: float = 0.0, metric: str = "top1", force: bool = False, reason: str = "",
            batch_size: int = 64, evaluator: Callable[[str], dict] | None = None) -> Decision:
    """Move ``alias`` to ``candidate`` (a version number; default: the newest version) when it beats
    the current holder by ``margin`` on ``val`` (default: the candidate's ``data.val`` tag).

    Both versions are scored on the same data, each with its own preprocessing; scores are cached in
    version tags keyed by the data fingerprint, so re-running evaluates nothing and changes nothing.
    """
    from mlflow.exceptions import MlflowException

    c = client()
    cand = resolve_version(f"models:/{name}/{candidate}" if candidate else f"models:/{name}/latest")
    cv = str(cand.version)
    try:
        champ = c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if not _is_missing(e):
            raise
        champ = None
    champ_v = str(champ.version) if champ else None
    if champ_v == cv:
        return Decision("already_champion", cv, champ_v, champ_v, metric=metric, margin=margin)

    val = val or (cand.tags or {}).get(TAG_VAL_DATA)
    if not val:
        raise RegistryError(f"no evaluation data: pass --val or tag version {cv} with {TAG_VAL_DATA}")
    fp = data_fingerprint(val)
    prev = cand.tags or {}
    if (not force and prev.get(TAG_DECISION) == "rejected" and prev.get(TAG_AGAINST) == (champ_v or "")
            and prev.get(TAG_DATA) == fp and prev.get(TAG_METRIC) == metric
            and float(prev.get(TAG_MARGIN, "nan")) == float(margin)):
        return Decision("unchanged", cv, champ_v, champ_v, float(prev[TAG_CAND_SCORE]),
                        float(prev[TAG_CHAMP_SCORE]), metric, margin, fp)

    if evaluator is None:
        def evaluator(uri):
            model, meta = load_model(uri)
            return evaluate(model, meta["spec"], val, batch_size=batch_size)

    cs = _version_score(name, cv, val, fp, metric, evaluator)
    hs = _version_score(name, champ_v, val, fp, metric, evaluator) if champ_v else None
    if champ_v is None:
        action = "initial"
    elif cs > hs and cs - hs >= margin:
        action = "promoted"
    elif force:
        action = "forced"
    else:
        action = "rejected"
    tags = {TAG_DECISION: action, TAG_AGAINST: champ_v or "", TAG_CAND_SCORE: f"{cs:.6f}",
            TAG_CHAMP_SCORE: "" if hs is None else f"{hs:.6f}", TAG_MARGIN: str(float(margin)),
            TAG_METRIC: metric, TAG_DATA: fp, TAG_TIME: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if action == "forced":
        tags[TAG_FORCED_BY] = _user()
        tags[TAG_FORCE_REASON] = reason or "forced with --force"
    for k, v in tags.items():
        c.set_model_version_tag(name, cv, k, v)
    if action in ("initial", "promoted", "forced"):
        c.set_registered_model_alias(name, alias, cv)
        if champ_v:
            c.set_model_version_tag(name, champ_v, TAG_REPLACED_BY, cv)
        after = cv
    else:
        after = champ_v
    return Decision(action, cv, champ_v, after, cs, hs, metric, margin, fp, changed=after != champ_v)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


# --------------------------------------------------------------------------------------------
# Batch prediction (files, folders, shards); Ray Data for large inputs
# --------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Paths/URLs -> (image files, shard URLs). A folder holding index.json, an index.json or a
    .tar is read as shards; other folders are searched recursively for images."""
    import fsspec

    files, shards = [], []
    for item in inputs:
        fs, path = fsspec.core.url_to_fs(item)
        proto = item.split("://", 1)[0] + "://" if "://" in item else ""
        if not fs.exists(path):
            raise RegistryError(f"input not found: {item}")
        if path.endswith(".tar"):
            shards.append(item)
        elif path.endswith("index.json") or (fs.isdir(path) and fs.exists(f"{path.rstrip('/')}/index.json")):
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
        self.device = _device()
        self.model.to(self.device).eval()
        self.k = top_k

    def __call__(self, batch: dict) -> dict:
        import torch

        if "image" in batch:
            images = list(batch["image"])
        else:  # webdataset rows: the first image-like column
            col = next(c for c in ("jpg", "jpeg", "png", "webp") if c in batch)
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

    model, meta = load_model(model_uri)
    spec: ModelSpec = meta["spec"]
    files, shards = expand_inputs(inputs)
    if use_ray is None:
        use_ray = bool(shards) or len(files) > ray_threshold
    if not use_ray:
        rows = []
        device = _device()
        model.to(device)
        items = [(f, f) for f in files] + [(k, img) for u in shards for k, img, _ in _iter_tar(u)]
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            x = preprocess([im for _, im in chunk], spec).to(device)
            with torch.inference_mode():
                out = top_k(model(x), spec, top_k_)
            rows += [{"input": str(name), **r} for (name, _), r in zip(chunk, out)]
        return rows
    return _predict_ray(model, spec, files, shards, top_k_, batch_size, concurrency)


def _iter_tar(url: str):
    import tarfile

    import fsspec

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        group: dict[str, dict[str, bytes]] = {}
        for m in tar:
            if m.isfile():
                folder, _, filename = m.name.rpartition("/")
                stem, _, ext = filename.partition(".")
                group.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = tar.extractfile(m).read()
    for key, s in group.items():
        img = next((s[e] for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
        if img is not None:
            yield key, img, s


def ensure_ray():
    """Attach to RAY_ADDRESS when set (e.g. inside `ray job submit`), else start a private local
    instance (never attach to a cluster recorded in /tmp/ray by someone else)."""
    import ray

    if not ray.is_initialized():
        addr = os.environ.get("RAY_ADDRESS")
        ray.init(address=addr or "local", log_to_driver=False, configure_logging=False,
                 include_dashboard=False if not addr else None)
    return ray


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
    ray = ensure_ray()
    import ray.data

    sd = {key: v.numpy() for key, v in fp32_state_dict(model).items()}
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
