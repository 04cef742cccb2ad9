"""The trained model as an MLflow artifact, the model registry, and resolving model URIs.

What is logged (``log_model``): an MLflow ``python_function`` model whose artifacts are

- ``weights/``: the fp32 state dict as safetensors (sharded with an index above 512 MB; models
  logged before carry ``weights.pt``, still read),
- ``spec.json``: the ``pipeline.spec.ModelSpec`` (variant, classes, size, class names, preprocessing),

plus the code of ``models`` and ``pipeline`` (``code_paths``) and a signature (no input example:
MLflow would check it by loading the model, weights and all, on the logging process). The weights
go from where they are (a run's exported files in storage) straight into the logged model's artifact
location: the logging process reads only their safetensors headers (the fit check) and never holds
or stages the model where it reaches the artifact store itself (``weights.artifact_url``).
Others score it with ``mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [png_bytes]}))``
(the output has ``label``, ``class_id``, ``score``, ``top_k_labels``, ``top_k_scores``); our own code
gets the PyTorch module back with ``load_model(uri) -> (model, metadata)`` (e.g. fine-tuning from
``models:/name@champion``). The weights are never pickled objects, so a logged model survives
refactoring of our classes; the spec is also stored as the MLmodel ``metadata`` so it can be read
without downloading weights (``mlflow.models.get_model_info(uri).metadata``).

Registry conventions (MLflow 3: aliases, not stages): a version is created per logged final model;
the ``champion`` alias points at the version that serves and is moved only by ``pipeline.promote``.
Versions are never deleted.

Errors a user can cause (missing run, alias or version, a bad URI) raise ``RegistryError`` with a
one-line message.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np

from pipeline.errors import PipelineError
from pipeline.spec import ModelSpec, preprocess, top_k
from pipeline.weights import (artifact_url, check_compatible, copy_to_artifacts, load_weights, to_fp32,
                              weight_shapes, write_weights)

WEIGHTS_DIR = "weights"
SPEC_FILE = "spec.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
TAG_VAL_DATA = "data.val"                    # version tag: the val split a version was trained against


class RegistryError(PipelineError):
    """A bad run id, alias, version or model URI."""


def device() -> "torch.device":  # noqa: F821
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        self.device = device()
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
        return _frame(rows)


def _frame(rows: list[dict]):
    """The pyfunc's output: one row per image (``spec.top_k``'s dicts)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=["label", "class_id", "score", "top_k_labels", "top_k_scores"])


def _load_from_files(weights_path: str, spec_path: str):
    return _build(weights_path, ModelSpec.from_dict(json.loads(Path(spec_path).read_text())))


def _build(weights_path: str, spec: ModelSpec):
    model = spec.build()
    sd = load_weights(weights_path)          # a safetensors folder, or an older model's weights.pt
    check_compatible(sd, model, what=f"weights for {spec.variant}")
    model.load_state_dict(sd)
    return model.eval(), spec


def _example_png(spec: ModelSpec) -> bytes:
    from PIL import Image

    h, w = spec.img_size
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def log_model(weights, spec: ModelSpec, *, name: str = "model",
              registered_model_name: str | None = None, version_tags: dict | None = None):
    """Log a model as a pyfunc into the active run; optionally register it. Returns
    (ModelInfo, ModelVersion | None).

    ``weights``: a weights location (folder or file, local or fsspec URL: a run's exported weights)
    or, for small models, a module or fp32 state dict (written to a temporary folder first). This
    process never holds the model: the weights are checked against ``spec`` from the safetensors
    headers on the meta device, the signature comes from the pyfunc's output on zero logits (no
    forward), the MLmodel is logged with an empty ``weights`` artifact, and the files are then copied
    into the logged model's artifact location (``weights.copy_to_artifacts``: storage to storage
    when this process reaches that store, else one shard at a time through the tracking server);
    only then is the version registered. A copy that fails marks the logged model FAILED.
    """
    import pandas as pd
    import torch
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import infer_signature

    if not isinstance(weights, (str, os.PathLike)):
        with tempfile.TemporaryDirectory(prefix="coatnet-model-") as tmp:
            folder = write_weights(os.path.join(tmp, WEIGHTS_DIR), to_fp32(weights).items())
            return log_model(folder, spec, name=name, registered_model_name=registered_model_name,
                             version_tags=version_tags)
    weights = str(weights)
    check_compatible(weight_shapes(weights), spec.build(device="meta"), what=f"weights to log ({weights})")
    example = pd.DataFrame({"image": [_example_png(spec)]})      # the input's schema
    with warnings.catch_warnings():  # "integer columns cannot hold missing values": none here
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, _frame(top_k(torch.zeros(1, spec.num_classes), spec, 5)),
                                    params={"top_k": 5})
    with tempfile.TemporaryDirectory() as tmp:
        placeholder, spath = os.path.join(tmp, WEIGHTS_DIR), os.path.join(tmp, SPEC_FILE)
        os.makedirs(placeholder)                 # filled in the store below, never here
        Path(spath).write_text(json.dumps(spec.to_dict(), indent=1))
        # Models from code: MLflow stores this file, not a pickled object of ours.
        entry = os.path.join(tmp, "coatnet_pyfunc.py")
        Path(entry).write_text("import mlflow\nfrom pipeline.registry import CoAtNetPyfunc\n\n"
                               "mlflow.models.set_model(CoAtNetPyfunc())\n")
        # no input_example: MLflow would validate it by loading the model, weights and all
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name, python_model=entry,
                artifacts={"weights": placeholder, "spec": spath},
                code_paths=[str(REPO_ROOT / "models"), str(REPO_ROOT / "pipeline")],
                signature=signature, pip_requirements=_requirements(), metadata={"coatnet_spec": spec.to_dict()},
            )
    folder = info.flavors["python_function"]["artifacts"]["weights"]["path"]
    location = client().get_logged_model(info.model_id).artifact_location
    try:
        copy_to_artifacts(weights, f"{location.rstrip('/')}/{folder}", tracking_uri=mlflow.get_tracking_uri())
    except BaseException:
        client().finalize_logged_model(info.model_id, LoggedModelStatus.FAILED)
        raise
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


def is_missing(e: Exception) -> bool:
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
        if is_missing(e):
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
        if not is_missing(e):
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
        if is_missing(e) or "run" in str(e).lower():
            raise RegistryError(f"no MLflow run with id {run_id!r} in {mlflow.get_tracking_uri()}") from None
        raise


def _download(uri: str, dst_path: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        resolve_version(uri)  # clear errors first
    elif uri.startswith("runs:/"):
        check_run(uri[len("runs:/"):].split("/", 1)[0])
    elif "://" not in uri and not uri.startswith("models:/") and not os.path.exists(uri):
        raise RegistryError(f"no model at {uri!r} (expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder)")
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst_path)
    except MlflowException as e:
        raise RegistryError(f"cannot download model {uri!r}: {e.message if hasattr(e, 'message') else e}") from None
    except OSError as e:
        raise RegistryError(f"cannot download model {uri!r}: {e}") from None


def _model_files(root: str, uri: str) -> tuple[str, ModelSpec]:
    """(weights location, spec) of the model we logged whose folder (holding MLmodel) is ``root``,
    a local path or fsspec URL; only MLmodel and spec.json are read."""
    import fsspec
    import yaml

    fs, path = fsspec.core.url_to_fs(root)
    root = root.rstrip("/")
    if not fs.exists(f"{path.rstrip('/')}/MLmodel"):
        raise RegistryError(f"{uri!r} is not an MLflow model (no MLmodel file)")
    with fs.open(f"{path.rstrip('/')}/MLmodel", "r") as f:
        flavor = (yaml.safe_load(f).get("flavors") or {}).get("python_function", {})
    arts = flavor.get("artifacts", {})
    if "weights" not in arts or "spec" not in arts:
        raise RegistryError(f"{uri!r} is not a CoAtNet model logged by pipeline.registry (no weights/spec artifacts)")
    path_of = lambda a: f"{root}/{a['path'] if isinstance(a, dict) else a}"  # noqa: E731
    with fsspec.open(path_of(arts["spec"]), "r") as f:
        spec = ModelSpec.from_dict(json.load(f))
    return path_of(arts["weights"]), spec


def _metadata(uri: str, spec: ModelSpec) -> dict:
    meta = {**spec.to_dict(), "spec": spec, "uri": uri}
    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        mv = resolve_version(uri)
        meta.update(name=mv.name, version=str(mv.version), run_id=mv.run_id)
    elif uri.startswith("runs:/"):
        meta["run_id"] = uri[len("runs:/"):].split("/", 1)[0]
    return meta


def fetch_model(uri: str, dst_path: str | None = None) -> tuple[str, ModelSpec, dict]:
    """Download a model we logged (into ``dst_path``, default MLflow's choice) WITHOUT loading it:
    (local weights folder or file, spec, metadata). ``uri`` and the metadata as for ``load_model``.
    Fine-tuning stages the weights from here file by file, so a driver never holds a large model."""
    local = _download(uri, dst_path)
    weights, spec = _model_files(local, uri)
    return weights, spec, _metadata(uri, spec)


def _model_location(uri: str) -> str:
    """The artifact location (an MLflow artifact URI) of the model folder ``uri`` names."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        uri = resolve_version(uri).source         # MLflow 3: models:/m-<id>; older versions a storage URI
    if uri.startswith("models:/m-"):
        try:
            return client().get_logged_model(uri[len("models:/"):].split("/", 1)[0]).artifact_location
        except MlflowException as e:
            raise RegistryError(f"no logged model {uri!r}: {e.message if hasattr(e, 'message') else e}") from None
    if uri.startswith("runs:/"):
        run_id, _, rest = uri[len("runs:/"):].partition("/")
        return f"{check_run(run_id).info.artifact_uri.rstrip('/')}/{rest}"
    return uri


def locate_model(uri: str) -> tuple[str, ModelSpec, dict] | None:
    """``fetch_model`` without downloading: (weights location in storage, spec, metadata) when the
    model's artifact location is storage this process reaches (``weights.artifact_url``: local, S3,
    the proxy's destination when known), reading only MLmodel and spec.json; None otherwise (then
    ``fetch_model``)."""
    root = artifact_url(_model_location(uri))
    if root is None:
        return None
    weights, spec = _model_files(root, uri)
    return weights, spec, _metadata(uri, spec)


def load_model(uri: str):
    """(torch model in eval mode, metadata) from a model we logged.

    ``uri``: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, models:/m-<id>, or a
    local folder holding the MLmodel. Metadata: the spec dict plus ``spec`` (ModelSpec), ``uri``,
    and, for registry URIs, ``name``, ``version``, ``run_id``.
    """
    weights, spec, meta = fetch_model(uri)
    return _build(weights, spec)[0], meta
