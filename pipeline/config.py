"""One config system for every job: a typed pydantic v2 model loaded from YAML, with dotted CLI
overrides (``train.lr=1e-3``), validated before any worker starts.

    cfg = load_config("configs/demo.yaml", ["train.steps=50", "scaling.num_workers=2"])
    cfg.train.global_batch == cfg.train.micro_batch * cfg.train.grad_accum * cfg.scaling.num_workers
    # (train.grad_accum is derived from the other three unless set)

``ConfigError`` carries a readable message naming the offending field(s); jobs print it and exit 2.
``resolved_dict(cfg)`` is the JSON-able resolved config (what goes into checkpoints and MLflow);
``flat_params(cfg)`` flattens it for MLflow params (both redacted: ``pipeline.redact``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.data.transforms import AugmentConfig
from pipeline.errors import PipelineError
from pipeline.redact import redact_values


class ConfigError(PipelineError, ValueError):
    """An invalid config; the message names the field(s) and is meant for the user as-is."""


class Section(BaseModel):
    """The base of every config section, here and in the workflow config: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    variant: str = "coatnet_pico"
    img_size: int = Field(32, ge=32)                 # divisible by 32 (5 stride-2 stages)
    num_classes: int | None = Field(None, ge=1)      # None: from the training shard index
    drop_path_rate: float | None = Field(None, ge=0, lt=1)   # None: the variant's default
    grad_checkpointing: bool = False                 # activation checkpointing
    zero_init: bool = False                          # build under deepspeed.zero.Init (big variants)
    attn_backend: Literal["auto", "sdpa", "flex", "math"] = "auto"   # see models/README.md
    compile: bool | None = None                      # torch.compile per block; None: on with GPUs
    compile_mode: Literal["blocks", "engine"] = "blocks"   # blocks: ZeRO-3 leaf blocks compiled one
                                                     # graph each; engine: DeepSpeed's engine.compile()
    # the network's form (models.create_model's preset and fields); see models/README.md
    preset: Literal["timm", "paper"] = "timm"        # paper: Eq. 5 stride, max pool, C-5 head 64, SD endpoint
    stride_mode: Literal["dw", "expand"] | None = None   # None: the preset's (paper's C-3 JFT: "dw")
    bn_eps: float | None = Field(None, gt=0)         # None: PyTorch's 1e-5 (TF reference: 1e-3)
    bn_momentum: float | None = Field(None, gt=0, lt=1)  # PyTorch convention; None: 0.1 (TF's 0.99 = 0.01)

    def architecture(self) -> dict[str, Any]:
        """``models.create_model`` keyword arguments for the form of the network: the preset and the
        fields set here (also what a ModelSpec records so a served model is built the same)."""
        out: dict[str, Any] = {"preset": self.preset} if self.preset != "timm" else {}
        for key in ("stride_mode", "bn_eps", "bn_momentum"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @field_validator("img_size")
    @classmethod
    def _div32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be divisible by 32, got {v}")
        return v


class SourceConfig(Section):
    """One dataset of a weighted mixture: its root (``<root>/<train_split>`` is read) and weight."""
    root: str
    weight: float = Field(ge=0)
    name: str | None = None               # None: the root's last path component


class DataConfig(Section):
    root: str = "data/demo"               # dataset root (local path or fsspec URL); validation data
    sources: list[SourceConfig] = []      # training mixture; empty: train on root alone
    train_split: str = "train"
    val_split: str | None = "val"         # None: no evaluation
    write_demo: bool = False              # write demo shards at root when absent
    demo_image_size: int = 64
    demo_num_train: int = 2000
    demo_num_val: int = 500
    loader_workers: int = Field(1, ge=0)
    seed: int = 0
    samples_per_epoch: int | None = None  # None: finite epochs (every sample once)
    augment: AugmentConfig = AugmentConfig()   # pipeline.data's own dataclass, validated here
    # where training JPEGs are decoded: "cpu" in the loader workers; "cuda" on the training GPU
    # (workers only read shards and draw the crops; non-JPEG images still decoded in the workers)
    decode_device: Literal["cpu", "cuda"] = "cpu"

    @property
    def train_url(self) -> str:
        return f"{self.root.rstrip('/')}/{self.train_split}"

    def train_sources(self) -> list[tuple[str, str, float]]:
        """(name, train split URL, weight) of each mixture source."""
        return [(s.name or s.root.rstrip("/").rsplit("/", 1)[-1], f"{s.root.rstrip('/')}/{self.train_split}",
                 s.weight) for s in self.sources]

    @model_validator(mode="after")
    def _mixture(self) -> DataConfig:
        if self.sources:
            if sum(s.weight for s in self.sources) <= 0:
                raise ValueError("data.sources: the weights sum to 0")
            if self.samples_per_epoch is not None:
                raise ValueError("data.sources and data.samples_per_epoch: a mixture already runs endlessly")
        return self

    @property
    def val_url(self) -> str | None:
        return None if self.val_split is None else f"{self.root.rstrip('/')}/{self.val_split}"


class CallbackSpec(Section):
    """``target``: "module:Class", constructed in every worker as ``Class(**kwargs)``."""
    target: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    kwargs: dict[str, Any] = {}


class TrainConfig(Section):
    global_batch: int = Field(64, ge=1)
    micro_batch: int = Field(32, ge=1)
    grad_accum: int | None = Field(None, ge=1)    # None: global_batch / (micro_batch x scaling.num_workers)
    steps: int | None = Field(None, ge=1)          # optimizer steps; exclusive with epochs
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int | None = Field(None, ge=0)   # exclusive with warmup_epochs / warmup_frac
    warmup_epochs: float | None = Field(None, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)   # None: no EMA
    loss: Literal["softmax", "sigmoid"] = "softmax"
    bf16: bool = True
    eval_every: int = Field(0, ge=0)               # steps; 0: only at the end
    checkpoint_every: int = Field(0, ge=0)         # steps; 0: only at the end
    checkpoint_every_minutes: float | None = Field(None, gt=0)   # also by the clock (decided at log steps)
    keep_last: int = Field(2, ge=1)
    upload_timeout_s: float = Field(600.0, ge=0)   # a checkpoint upload retries through storage outages this long
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=-1)            # worker-group restarts; -1: no limit (spot fleets)
    # extra per-worker callbacks (profilers, test probes): see pipeline.train.Callback
    callbacks: list[CallbackSpec] = []

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("set at most one of train.warmup_steps and train.warmup_epochs")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)               # the most workers (the batch invariant's count)
    min_workers: int | None = Field(None, ge=1)     # elastic: runs on counts in min..num_workers (pipeline.elastic)
    resize_check_s: float = Field(60.0, ge=0)       # elastic: how often Ray looks for more resources
    restart_settle_s: float | None = Field(None, ge=0)   # elastic: wait after a failure; None: Ray's node-death detection time
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = {}
    torch_threads: int | None = Field(None, ge=1)   # None: cpus_per_worker (CPU workers)
    accelerator_type: str | None = None             # Ray's name (H100, A100-40G...): GPUs of this type only
    placement_timeout_s: float = Field(600.0, gt=0)  # a group not placed by then fails (pipeline.placement)

    @model_validator(mode="after")
    def _accelerator(self) -> ScalingConfig:
        if self.accelerator_type and not self.use_gpu:
            raise ValueError("scaling.accelerator_type needs scaling.use_gpu=true")
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[3] = 3
    offload: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    overlap_comm: bool | None = None    # None: the profile's setting on GPUs, off on CPU workers
    extra: dict[str, Any] = {}          # merged last into the DeepSpeed config (pipeline.engine)

    @model_validator(mode="after")
    def _nvme(self) -> DeepSpeedConfig:
        if self.offload == "nvme" and not self.nvme_path:
            raise ValueError("deepspeed.offload=nvme needs deepspeed.nvme_path")
        return self


class TrackingConfig(Section):
    tracking_uri: str | None = None     # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "coatnet-pretrain"
    run_name: str | None = None         # None: storage.name
    system_metrics: bool = True         # MLflow's CPU/memory/GPU monitor on the rank-0 worker
    system_metrics_interval_s: float = Field(10.0, gt=0)
    outage_timeout_s: float = Field(900.0, ge=0)   # how long a tracking-server outage is waited out at the end


class StorageConfig(Section):
    storage_path: str = "runs"          # local folder or s3://bucket/prefix
    name: str = "demo"                  # Ray run name; the same name + storage_path resumes


class InitConfig(Section):
    """Start from existing weights (fine-tuning): fp32 weights (a ``weights/`` safetensors folder of a
    pretraining run, local or fsspec URL). Relative-position tables are resized to
    ``model.img_size``; a head whose shape differs is replaced (``reset_head``: always)."""
    from_checkpoint: str | None = None
    reset_head: bool = False
    strict: bool = True                 # missing/unexpected body keys are an error


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(steps=100)
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    init: InitConfig = InitConfig()
    description: str = ""

    @model_validator(mode="after")
    def _decode(self) -> Config:
        a = self.data.augment
        if self.data.decode_device == "cuda":
            if not self.scaling.use_gpu:
                raise ValueError("data.decode_device=cuda needs scaling.use_gpu=true")
            if a.randaug_n > 0 and not a.randaug_device:
                raise ValueError("data.decode_device=cuda needs data.augment.randaug_device=true (or randaug_n=0): "
                                 "the loader workers no longer have the pixels")
        return self

    @model_validator(mode="after")
    def _batch(self) -> Config:
        """Gradient accumulation follows from the global batch, the micro batch and the worker count
        (as torchtitan derives it), so changing ``scaling.num_workers`` is one knob; set, it must agree."""
        t, w = self.train, self.scaling.num_workers
        if t.grad_accum is None:
            if t.global_batch % (t.micro_batch * w):
                raise ValueError(
                    f"train.global_batch ({t.global_batch}) is not a multiple of train.micro_batch "
                    f"({t.micro_batch}) x scaling.num_workers ({w}) = {t.micro_batch * w}")
            t.grad_accum = t.global_batch // (t.micro_batch * w)
        elif t.micro_batch * t.grad_accum * w != t.global_batch:
            raise ValueError(
                f"train.micro_batch ({t.micro_batch}) x train.grad_accum ({t.grad_accum}) x "
                f"scaling.num_workers ({w}) = {t.micro_batch * t.grad_accum * w} must equal "
                f"train.global_batch ({t.global_batch}); leave train.grad_accum unset to derive it")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides, errors
# ---------------------------------------------------------------------------------------------

def _parse_value(text: str) -> Any:
    """A CLI value as YAML would read it (numbers, bools, null, lists), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides in place; a numeric part indexes a list
    (``finetune.0.overrides=[...]`` in a workflow config)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {key}: {p} is not an index of a {len(node)}-item list")
                if last:
                    node[int(p)] = _parse_value(value)
                else:
                    node = node[int(p)]
            elif isinstance(node, dict):
                if last:
                    node[p] = _parse_value(value)
                else:
                    node = node.setdefault(p, {})
            else:
                raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is not a section")
    return data


def format_errors(err: ValidationError, what: str = "config") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return f"invalid {what}:\n" + "\n".join(lines)


def config_from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged over ``base`` (neither is changed): mappings key by key, anything else
    (lists, scalars, null) replaced as a whole."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_recipe(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe as a dict, its ``base:`` resolved: ``base: <path>`` (relative to the recipe's
    folder) is read first, recursively, and the recipe's own keys are deep-merged over it
    (``deep_merge``). A missing file, bad YAML, a non-mapping or a base cycle -> one-line ``ConfigError``."""
    p = Path(path)
    if p.resolve() in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, p.resolve()))
        raise ConfigError(f"config file {_chain[-1]}: base cycle {cycle}")
    if not p.is_file():
        if _chain:
            raise ConfigError(f"config file {_chain[-1]}: its base {path} does not exist")
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {path}: base must be a file path (relative to its folder), got {base!r}")
    return deep_merge(read_recipe(p.parent / base, (*_chain, p.resolve())), data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or none: the embedded defaults; ``base:`` resolved by ``read_recipe``) + dotted
    overrides -> validated ``Config``."""
    data: dict[str, Any] = read_recipe(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, list(overrides or [])))


# ---------------------------------------------------------------------------------------------
# Resolved forms
# ---------------------------------------------------------------------------------------------

def resolved_dict(cfg: Config) -> dict[str, Any]:
    return redact_values(cfg.model_dump(mode="json"))


def flat_params(cfg: Config) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)[:500]
    walk("", resolved_dict(cfg))
    return out


def is_remote(path: str) -> bool:
    """Object storage or another remote filesystem (a scheme other than file://); else a local path."""
    return "://" in path and not path.startswith("file://")


def tracking_uri(cfg: Config) -> str:
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def resolve_paths(cfg: Config) -> Config:
    """Relative local paths -> absolute (Ray workers run in other working directories)."""
    cfg = cfg.model_copy(deep=True)
    if not is_remote(cfg.data.root):
        cfg.data.root = os.path.abspath(cfg.data.root)
    for src in cfg.data.sources:
        if not is_remote(src.root):
            src.root = os.path.abspath(src.root)
    if not is_remote(cfg.storage.storage_path):
        cfg.storage.storage_path = os.path.abspath(cfg.storage.storage_path)
    cfg.tracking.tracking_uri = tracking_uri(cfg)
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = cfg.storage.name
    return cfg
