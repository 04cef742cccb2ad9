"""The whole chain as one MLflow parent run: pretrain -> finetune (one or more resolutions) ->
evaluate -> register -> promote, each stage a nested run.

    wf = load_workflow("configs/workflow_demo.yaml", ["finetune.0.overrides=[train.steps=30]"])
    result = run_workflow(wf)

Re-running is safe and cheap:

- every stage has a key: a hash of its own config and of its inputs (the keys of the stages it
  consumes; the evaluation data's fingerprint). A stage whose nested run carries that key and
  ``workflow.status=completed`` is skipped and its recorded outputs (``workflow.outputs``) are used;
- training stages run under a Ray run name derived from their key, so an interrupted stage is
  resumed from its last checkpoint by ``pipeline.launch`` (same ``storage.name``) and continues its
  MLflow run (same run key);
- the parent run is found again by the workflow's key (``workflow.key`` tag).

Tags on every nested run: ``workflow.stage``, ``workflow.stage_key``, ``workflow.status``
(running | completed), ``workflow.outputs`` (JSON), ``mlflow.parentRunId``.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field, ValidationError

from pipeline.config import (Config, ConfigError, Section, apply_overrides, config_from_dict, format_errors,
                             read_recipe)
from pipeline.console import say

REPO_ROOT = Path(__file__).resolve().parents[1]
PARENT = "mlflow.parentRunId"
T_WF_KEY, T_WF_NAME = "workflow.key", "workflow.name"
T_STAGE, T_KEY, T_STATUS, T_OUT = "workflow.stage", "workflow.stage_key", "workflow.status", "workflow.outputs"


class StageSpec(Section):
    config: str | None = None              # YAML recipe (relative: to the cwd, then the repo)
    overrides: list[str] = []              # dotted section.key=value, applied after the YAML


class EvaluateSpec(Section):
    val: str | None = None                 # default: the last fine-tuning stage's val split
    batch_size: int = Field(64, ge=1)
    baseline: bool = True                  # also score the pretrained model at each new resolution
    # on the cluster's workers (pipeline.evaluate_ray), GPUs when the stage trained on GPUs;
    # None: as many as the fine-tuning stage's scaling.num_workers; 0: in the driver process
    workers: int | None = Field(None, ge=0)
    precision: str | None = Field(None, pattern="^(fp32|bf16)$")   # None: the stage's (train.bf16)


class RegisterSpec(Section):
    name: str = "coatnet-demo"
    select: str = Field("best", pattern="^(best|last)$")   # which fine-tuned model to register
    use_ema: bool = True                   # register (and evaluate) a run's EMA model when it has one


class PromoteSpec(Section):
    enabled: bool = True
    alias: str = "champion"
    margin: float = 0.0
    metric: str | None = Field(None, pattern="^(top1|top5|precision_at_1|recall_at_5|mAP)$")  # None: by label type
    significance: float | None = Field(0.05, gt=0, lt=1)   # McNemar's paired test; None: margin only


class WorkflowConfig(Section):
    name: str = "demo"
    description: str = ""
    tracking_uri: str | None = None        # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "coatnet-workflow"
    storage_path: str = "runs"             # Ray runs and staged weights (local or s3://)
    pretrain: StageSpec | None = StageSpec(config="configs/demo.yaml")
    pretrained_from: str | None = None     # instead of pretraining: run id, models:/..., folder
    finetune: list[StageSpec] = [StageSpec(config="configs/finetune_demo.yaml")]
    evaluate: EvaluateSpec = EvaluateSpec()
    registry: RegisterSpec = RegisterSpec()   # the "register" stage
    promote: PromoteSpec = PromoteSpec()


def _find_file(path: str, base: Path | None) -> Path:
    for root in (Path.cwd(), base, REPO_ROOT):
        if root is not None and (root / path).is_file():
            return root / path
    if Path(path).is_file():
        return Path(path)
    raise ConfigError(f"config file {path} not found (looked in {Path.cwd()}, {base}, {REPO_ROOT})")


def load_workflow(path: str | None = None, overrides: list[str] | None = None) -> tuple[WorkflowConfig, Path | None]:
    data: dict[str, Any] = {}
    base = None
    if path:
        p = _find_file(path, None)
        base = p.parent
        data = yaml.safe_load(p.read_text()) or {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return WorkflowConfig.model_validate(data), base
    except ValidationError as e:
        raise ConfigError(format_errors(e, "workflow config")) from None


def stage_config(spec: StageSpec, wf: WorkflowConfig, base: Path | None) -> tuple[Config, dict]:
    """The stage's Config (YAML + overrides) with the workflow's tracking and storage; and the dict
    its key is computed from (as written: relative paths stay relative)."""
    data: dict[str, Any] = {}
    if spec.config:
        data = read_recipe(_find_file(spec.config, base))
    data = apply_overrides(data, list(spec.overrides))
    data.setdefault("tracking", {})
    data["tracking"].update(tracking_uri=wf.tracking_uri, experiment=wf.experiment)
    data.setdefault("storage", {})["storage_path"] = wf.storage_path
    cfg = config_from_dict(data)
    keyed = cfg.model_dump(mode="json")
    for volatile in ("tracking", "storage", "description"):
        keyed.pop(volatile, None)
    keyed.get("train", {}).pop("callbacks", None)    # probes and profilers do not change the result
    return cfg, keyed


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# MLflow bookkeeping
# --------------------------------------------------------------------------------------------

class Book:
    """Parent run + nested stage runs, all through one MlflowClient (no fluent global state)."""

    def __init__(self, uri: str, experiment: str, wf_key: str, name: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.c = MlflowClient(tracking_uri=uri)
        exp = self.c.get_experiment_by_name(experiment)
        self.exp_id = exp.experiment_id if exp else self.c.create_experiment(experiment)
        found = self.c.search_runs([self.exp_id], f"tags.`{T_WF_KEY}` = '{wf_key}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            self.parent = found[0].info.run_id
            self.c.update_run(self.parent, status="RUNNING")
            self.resumed = True
        else:
            self.parent = self.c.create_run(self.exp_id, run_name=f"workflow-{name}",
                                            tags={T_WF_KEY: wf_key, T_WF_NAME: name}).info.run_id
            self.resumed = False

    def completed(self, key: str) -> dict | None:
        runs = self.c.search_runs([self.exp_id], f"tags.`{T_KEY}` = '{key}' and tags.`{T_STATUS}` = 'completed'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        return {"run_id": runs[0].info.run_id, **json.loads(runs[0].data.tags.get(T_OUT, "{}"))}

    def stage_tags(self, stage: str, key: str) -> dict[str, str]:
        return {PARENT: self.parent, T_STAGE: stage, T_KEY: key, T_STATUS: "running"}

    def open_stage(self, stage: str, key: str) -> str:
        """A nested run for a driver-side stage (evaluate, register, promote); reused after a crash."""
        runs = self.c.search_runs([self.exp_id], f"tags.`{T_KEY}` = '{key}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            self.c.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
        return self.c.create_run(self.exp_id, run_name=stage, tags=self.stage_tags(stage, key)).info.run_id

    def complete(self, run_id: str, outputs: dict, *, terminate: bool = True) -> None:
        self.c.set_tag(run_id, T_OUT, json.dumps(outputs, default=str)[:5000])
        self.c.set_tag(run_id, T_STATUS, "completed")
        if terminate and self.c.get_run(run_id).info.status != "FINISHED":
            self.c.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str | None) -> None:
        for r in (run_id, self.parent):
            if r:
                try:
                    self.c.set_terminated(r, "FAILED")
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass


# --------------------------------------------------------------------------------------------
# Results (what jobs/workflow.py prints and writes with --summary)
# --------------------------------------------------------------------------------------------

@dataclass
class StageResult:
    name: str
    key: str
    run_id: str
    outputs: dict[str, Any]
    skipped: bool = False           # completed by an earlier run of the same workflow


@dataclass
class WorkflowResult:
    FORMAT = 1

    parent_run_id: str
    stages: dict[str, StageResult] = field(default_factory=dict)

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages.values() if s.skipped]

    def outputs(self, stage: str) -> dict[str, Any]:
        return self.stages[stage].outputs

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "parent_run_id": self.parent_run_id, "skipped": self.skipped,
                "stages": {n: {"run_id": s.run_id, "key": s.key, "skipped": s.skipped, **s.outputs}
                           for n, s in self.stages.items()}}


# --------------------------------------------------------------------------------------------
# The stage runner and the stages
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingStage:
    """A training stage of the plan: its name (``pretrain``, ``finetune384``, ``finetune512-1``...),
    its config and its key (a hash of what it computes from: its config and its inputs' keys)."""

    name: str
    config: Config
    key: str


@dataclass
class Plan:
    """Every stage's config and key, computed before anything runs (a bad config stops here)."""

    wf: WorkflowConfig
    base: Path | None
    pretrain: TrainingStage | None
    pretrain_key: str                               # the pretraining stage's, or pretrained_from's
    finetune: list[TrainingStage]

    @property
    def key(self) -> str:
        return key_of(self.wf.model_dump(mode="json", exclude={"description"}), self.pretrain_key,
                      [stage.key for stage in self.finetune])

    def finetune_stage(self, name: str) -> TrainingStage:
        return next(stage for stage in self.finetune if stage.name == name)


def plan_stages(wf: WorkflowConfig, base: Path | None = None) -> Plan:
    if wf.pretrain is None and not wf.pretrained_from:
        raise ConfigError("workflow: set pretrain (a stage) or pretrained_from (a run, model URI or folder)")
    if not wf.finetune:
        raise ConfigError("workflow: finetune needs at least one stage")
    pretrain = None
    if wf.pretrain is not None:
        cfg, keyed = stage_config(wf.pretrain, wf, base)
        pretrain = TrainingStage("pretrain", cfg, key_of("pretrain", keyed))
    pre_key = pretrain.key if pretrain else key_of("pretrained_from", wf.pretrained_from)
    finetune = []
    for i, spec in enumerate(wf.finetune):
        cfg, keyed = stage_config(spec, wf, base)
        name = f"finetune{cfg.model.img_size}" + (f"-{i}" if len(wf.finetune) > 1 else "")
        finetune.append(TrainingStage(name, cfg, key_of("finetune", keyed, pre_key)))
    return Plan(wf, base, pretrain, pre_key, finetune)


class Runner:
    """Runs a stage unless a completed nested run has its key; records what it produced."""

    def __init__(self, book: Book, result: WorkflowResult) -> None:
        self.book, self.result = book, result
        self.ray = ExitStack()         # one Ray for every training stage, started on first need
        self._ray_started = False

    def ensure_ray(self, cfg: Config) -> None:
        from pipeline.cluster import ray_session
        from pipeline.launch import ray_cpus

        if not self._ray_started:
            self.ray.enter_context(ray_session(ray_cpus(cfg)))
            self._ray_started = True

    def stage(self, name: str, key: str, body: Callable[[str | None], dict[str, Any]], *,
              driver_side: bool = True) -> dict[str, Any]:
        """``body(run_id)`` does the work and returns the outputs. Driver-side stages get a nested
        run opened here; training stages (``driver_side=False``) create theirs through
        ``pipeline.launch`` and return its ``run_id`` among the outputs."""
        done = self.book.completed(key)
        if done:
            run_id = done.pop("run_id")
            say(f"[workflow] {name}: completed earlier in run {run_id}, skipped")
            self.result.stages[name] = StageResult(name, key, run_id, done, skipped=True)
            return done
        run_id = self.book.open_stage(name, key) if driver_side else None
        try:
            outputs = body(run_id)
        except BaseException:
            self.book.fail(run_id)
            raise
        run_id = run_id or outputs.pop("run_id")
        self.book.complete(run_id, outputs, terminate=driver_side)
        self.result.stages[name] = StageResult(name, key, run_id, outputs)
        return outputs


def _train(runner: Runner, wf: WorkflowConfig, stage: TrainingStage, source=None) -> dict[str, Any]:
    """A Ray/DeepSpeed training stage (pretrain or a fine-tuning), resumed when interrupted."""
    from pipeline import launch
    from pipeline.finetune import run_finetune

    name, key = stage.name, stage.key
    cfg = stage.config.model_copy(deep=True)
    cfg.storage.name = f"{wf.name}-{name}-{key[:10]}"
    cfg.tracking.run_name = name
    rcfg, _ = launch.prepare(cfg)
    tags = runner.book.stage_tags(name, key)
    runner.ensure_ray(rcfg)
    if source is None:
        say(f"[workflow] {name}: Ray run {rcfg.storage.name} (an existing one resumes from its last checkpoint)")
        summary = launch.run(rcfg, stage=name, extra_tags=tags)
    else:
        say(f"[workflow] {name}: from {source.ref} at {cfg.model.img_size}px (Ray run {rcfg.storage.name})")
        summary, _ = run_finetune(rcfg, source, extra_tags=tags)
    return {"run_id": summary.mlflow_run_id, "mlflow_run_id": summary.mlflow_run_id,
            "weights": summary.weights, "checkpoint": summary.checkpoint, "steps": summary.steps,
            "img_size": rcfg.model.img_size, "variant": rcfg.model.variant,
            "num_classes": rcfg.model.num_classes, "val": rcfg.data.val_url,
            "metrics": {k: v for k, v in summary.metrics.items() if k.startswith("eval/")}}


def spec_for(cfg: Config, index):
    """The ModelSpec of a model trained by ``cfg`` (eval preprocessing = the loader's)."""
    from pipeline.spec import ModelSpec

    overrides = {} if cfg.model.drop_path_rate is None else {"drop_path_rate": cfg.model.drop_path_rate}
    overrides.update(cfg.model.architecture())     # the paper's form is built as the paper's form
    a = cfg.data.augment
    return ModelSpec(variant=cfg.model.variant, num_classes=index.num_classes, img_size=cfg.model.img_size,
                     overrides=overrides, class_names=list(index.class_names), mean=tuple(a.mean),
                     std=tuple(a.std), crop_pct=a.eval_crop_pct, interpolation=a.interpolation,
                     label_type=index.label_type)


def _eval_options(wf: WorkflowConfig, cfg: Config) -> dict[str, Any]:
    """Where and how a stage's models are scored: its workers, GPUs and training precision."""
    ev = wf.evaluate
    return {"workers": cfg.scaling.num_workers if ev.workers is None else ev.workers,
            "use_gpu": cfg.scaling.use_gpu, "cpus_per_worker": cfg.scaling.cpus_per_worker,
            "precision": ev.precision or ("bf16" if cfg.train.bf16 else "fp32"),
            "loader_workers": cfg.data.loader_workers if cfg.scaling.use_gpu else 0,
            "start_timeout_s": cfg.scaling.placement_timeout_s, "batch_size": ev.batch_size}


def _score(model_ref, spec, val: str, opts: dict[str, Any], model=None) -> dict:
    """One model's scores: on ``opts['workers']`` Ray workers (the driver merges), or here with 0."""
    from pipeline.evaluate import evaluate_model
    from pipeline.evaluate_ray import evaluate_on_cluster

    if opts["workers"] == 0:
        return evaluate_model(model if model is not None else model_ref.load()[0], spec, val,
                              batch_size=opts["batch_size"], precision=opts["precision"])
    return evaluate_on_cluster(model_ref, val, **opts)


def _tuned_ref(run_id: str, use_ema: bool, spec):
    """The fine-tuned model for the workers: ``runs:/ID/weights_ema`` (its EMA model, when it has one
    and ``use_ema``) or ``/weights``, fetched by each worker itself - what ``finetune.resolve_source``
    reads; a run without them (its final checkpoint only) is consolidated here and sent."""
    from mlflow import MlflowClient

    from pipeline.evaluate_ray import ModelRef
    from pipeline.finetune import resolve_source
    from pipeline.weights import EMA_WEIGHTS_DIR, WEIGHTS_DIR

    names = {a.path for a in MlflowClient().list_artifacts(run_id)}
    which = EMA_WEIGHTS_DIR if use_ema and EMA_WEIGHTS_DIR in names else WEIGHTS_DIR
    if which in names:
        return ModelRef.from_weights(f"runs:/{run_id}/{which}", spec)
    with resolve_source(run_id, ema=use_ema) as tuned:
        return ModelRef.from_model(tuned.load(), spec)


def _evaluate(plan: Plan, runner: Runner, source, val: str, val_index) -> dict[str, Any]:
    """Every fine-tuned model on ``val``, and (baseline) the pretrained model resized, untuned; on the
    cluster's workers, which read the fine-tuned weights from the runs' artifacts and the source from
    the stage's staged copy (``init/``, tag ``coatnet.source_weights``) themselves."""
    from mlflow import MlflowClient

    from pipeline.evaluate import PRIMARY
    from pipeline.evaluate_ray import ModelRef
    from pipeline.finetune import adapt

    metric, result = PRIMARY[val_index.label_type], runner.result
    scores: dict[str, dict] = {}
    pretrained = None                  # the source's weights, read once for every baseline
    for training in plan.finetune:
        stage, cfg = training.name, training.config
        spec = spec_for(cfg, val_index)
        opts = _eval_options(plan.wf, cfg)
        if opts["workers"]:
            runner.ensure_ray(cfg)     # the workflow's one Ray (started here when training was skipped)
        tuned = _tuned_ref(result.stages[stage].run_id, plan.wf.registry.use_ema, spec)
        scores[stage] = _score(tuned, spec, val, opts)
        line = f"[workflow] evaluate: {stage} {metric} {scores[stage][metric]:.4f}"
        if plan.wf.evaluate.workers != 0:
            line += f" ({opts['workers']} workers, {opts['precision']})"
        if plan.wf.evaluate.baseline and source.num_classes == spec.num_classes:
            staged = MlflowClient().get_run(result.stages[stage].run_id).data.tags.get("coatnet.source_weights")
            if opts["workers"] and staged:   # the workers read the stage's staged source and resize it
                untuned = _score(ModelRef.from_weights(staged, spec, adapt=True), spec, val, opts)
            else:                   # the driver adapts the source (resized tables); scored here or sent
                pretrained = pretrained if pretrained is not None else source.load()
                model = spec.build()
                sd, _ = adapt(source, cfg.model.variant, cfg.model.img_size, spec.num_classes, model=model,
                              state_dict=pretrained, architecture=cfg.model.architecture())
                model.load_state_dict(sd, strict=False)
                ref = ModelRef.from_model(model, spec) if opts["workers"] else None
                untuned = _score(ref, spec, val, opts, model=model)
            scores[f"{stage}/pretrained_untuned"] = untuned
            line += f" (pretrained, resized, not fine-tuned: {untuned[metric]:.4f})"
        say(line)
    return {"val": val, "metric": metric, "scores": scores}


def _register(plan: Plan, result: WorkflowResult, run_id: str, pick: str, val: str, val_index) -> dict[str, Any]:
    """Log the picked fine-tuned model as a pyfunc into the register run (its weight files copied
    from the fine-tuning run's, never loaded on the driver); a version with lineage tags."""
    import mlflow

    from pipeline.finetune import resolve_source
    from pipeline.registry import TAG_VAL_DATA, log_model

    wf = plan.wf
    cfg = plan.finetune_stage(pick).config
    ev = result.outputs("evaluate")
    score = ev["scores"][pick][ev["metric"]]
    tags = {TAG_VAL_DATA: val, "workflow.run": result.parent_run_id, "workflow.stage": pick,
            "coatnet.finetune_run": result.stages[pick].run_id, f"coatnet.val_{ev['metric']}": f"{score:.6f}"}
    if "pretrain" in result.stages:
        tags["coatnet.pretrain_run"] = result.stages["pretrain"].run_id
    # the picked run's files where they lie (a download only when nothing else reaches them): checked
    # from their headers and copied into the logged model's artifacts, never loaded here
    with resolve_source(result.stages[pick].run_id, ema=wf.registry.use_ema) as picked, \
            mlflow.start_run(run_id=run_id):
        info, mv = log_model(picked.weights, spec_for(cfg, val_index), registered_model_name=wf.registry.name,
                             version_tags=tags)
    say(f"[workflow] register: {wf.registry.name} version {mv.version} ({pick}, val {ev['metric']} {score:.4f})")
    return {"version": str(mv.version), "model_uri": info.model_uri, "name": wf.registry.name, "stage": pick}


def _promote(plan: Plan, runner: Runner, run_id: str, version: str, val: str) -> dict[str, Any]:
    from pipeline.promote import promote

    p = plan.wf.promote
    opts = _eval_options(plan.wf, plan.finetune[-1].config)     # scored where the evaluate stage scores
    if opts["workers"]:
        runner.ensure_ray(plan.finetune[-1].config)
    d = promote(plan.wf.registry.name, version, val=val, alias=p.alias, margin=p.margin,
                metric=p.metric, significance=p.significance, batch_size=opts.pop("batch_size"), eval_options=opts)
    for k, v in d.to_dict().items():
        runner.book.c.set_tag(run_id, f"promotion.{k}", str(v))
    say(f"[workflow] promote: {d.action} (candidate {d.candidate_score}, champion {d.champion_score}); "
        f"{p.alias} -> version {d.champion_after}")
    return d.to_dict()


def run_workflow(wf: WorkflowConfig, base: Path | None = None) -> WorkflowResult:
    """pretrain -> finetune* -> evaluate -> register -> promote, each stage skipped when done."""
    import mlflow

    from pipeline.config import tracking_uri
    from pipeline.data import ShardIndex
    from pipeline.finetune import resolve_source

    uri = tracking_uri(Config(tracking={"tracking_uri": wf.tracking_uri}))
    mlflow.set_tracking_uri(uri)
    plan = plan_stages(wf, base)          # keys first (cheap): a config error stops before anything runs
    book = Book(uri, wf.experiment, plan.key, wf.name)
    say(f"[workflow] MLflow parent run {book.parent} ({'continued' if book.resumed else 'new'}) in {uri}")
    result = WorkflowResult(book.parent)
    runner = Runner(book, result)
    with runner.ray:
        if plan.pretrain is not None:
            runner.stage("pretrain", plan.pretrain.key, lambda _: _train(runner, wf, plan.pretrain), driver_side=False)
            source_ref = result.stages["pretrain"].run_id
        else:
            source_ref = wf.pretrained_from
        source = resolve_source(source_ref, tracking_uri=uri)
        for stage in plan.finetune:
            runner.stage(stage.name, stage.key, lambda _, s=stage: _train(runner, wf, s, source), driver_side=False)

        last_ft = plan.finetune[-1].name
        val = wf.evaluate.val or result.outputs(last_ft)["val"]
        val_index = ShardIndex.load(val)
        ev_key = key_of("evaluate", [stage.key for stage in plan.finetune], val_index.fingerprint(),
                        wf.evaluate.model_dump())
        runner.stage("evaluate", ev_key, lambda _: _evaluate(plan, runner, source, val, val_index))

        ev = result.outputs("evaluate")
        names = [stage.name for stage in plan.finetune]
        pick = (max(names, key=lambda s: ev["scores"][s][ev["metric"]]) if wf.registry.select == "best"
                else names[-1])
        reg_key = key_of("register", ev_key, pick, wf.registry.name)
        version = runner.stage("register", reg_key,
                               lambda run_id: _register(plan, result, run_id, pick, val, val_index))["version"]
        if wf.promote.enabled:
            pr_key = key_of("promote", reg_key, wf.promote.model_dump())
            runner.stage("promote", pr_key, lambda run_id: _promote(plan, runner, run_id, version, val))
    book.c.set_tag(book.parent, "workflow.registered_version", str(version))
    book.c.set_terminated(book.parent, "FINISHED")
    return result
