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
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import Config, ConfigError, apply_overrides, config_from_dict, format_errors

REPO_ROOT = Path(__file__).resolve().parents[1]
PARENT = "mlflow.parentRunId"
T_WF_KEY, T_WF_NAME = "workflow.key", "workflow.name"
T_STAGE, T_KEY, T_STATUS, T_OUT = "workflow.stage", "workflow.stage_key", "workflow.status", "workflow.outputs"


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageSpec(_S):
    config: str | None = None              # YAML recipe (relative: to the cwd, then the repo)
    overrides: list[str] = []              # dotted section.key=value, applied after the YAML


class EvaluateSpec(_S):
    val: str | None = None                 # default: the last fine-tuning stage's val split
    batch_size: int = Field(64, ge=1)
    baseline: bool = True                  # also score the pretrained model at each new resolution


class RegisterSpec(_S):
    name: str = "coatnet-demo"
    select: str = Field("best", pattern="^(best|last)$")   # which fine-tuned model to register


class PromoteSpec(_S):
    enabled: bool = True
    alias: str = "champion"
    margin: float = 0.0
    metric: str = Field("top1", pattern="^(top1|top5)$")


class WorkflowConfig(_S):
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
        data = yaml.safe_load(_find_file(spec.config, base).read_text()) or {}
    data = apply_overrides(data, list(spec.overrides))
    data.setdefault("tracking", {})
    data["tracking"].update(tracking_uri=wf.tracking_uri, experiment=wf.experiment)
    data.setdefault("storage", {})["storage_path"] = wf.storage_path
    cfg = config_from_dict(data)
    keyed = cfg.model_dump(mode="json")
    for volatile in ("tracking", "storage", "description"):
        keyed.pop(volatile, None)
    for k in [k for k in keyed.get("train", {}) if k.startswith("debug_")]:
        keyed["train"].pop(k)          # test hooks do not change what a stage computes
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
# Stages
# --------------------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(f"[workflow {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _training_stage(book: Book, stage: str, key: str, cfg: Config, wf: WorkflowConfig, source=None) -> dict:
    """Run (or resume) a Ray/DeepSpeed training stage inside its nested run."""
    from pipeline import launch
    from pipeline.finetune import run_finetune

    cfg = cfg.model_copy(deep=True)
    cfg.storage.name = f"{wf.name}-{stage}-{key[:10]}"
    cfg.tracking.run_name = stage
    rcfg, _ = launch.prepare(cfg)
    tags = book.stage_tags(stage, key)
    if source is None:
        _say(f"{stage}: Ray run {rcfg.storage.name} (an existing one resumes from its last checkpoint)")
        summary = launch.run(rcfg, stage=stage, extra_tags=tags)
    else:
        _say(f"{stage}: from {source.ref} at {cfg.model.img_size}px (Ray run {rcfg.storage.name})")
        summary, _ = run_finetune(rcfg, source, extra_tags=tags)
    out = {"mlflow_run_id": summary.mlflow_run_id, "weights": summary.weights, "checkpoint": summary.checkpoint,
           "steps": summary.steps, "img_size": rcfg.model.img_size, "variant": rcfg.model.variant,
           "num_classes": rcfg.model.num_classes, "val": rcfg.data.val_url,
           "metrics": {k: v for k, v in summary.metrics.items() if k.startswith("eval/")}}
    book.complete(summary.mlflow_run_id, out, terminate=False)
    return {"run_id": summary.mlflow_run_id, **out}


def _spec_for(cfg: Config, index) -> "Any":
    """The ModelSpec of a model trained by ``cfg`` (eval preprocessing = the loader's)."""
    from pipeline.data import AugmentConfig
    from pipeline.registry import ModelSpec

    class _M:  # the spec needs only these two numbers of the network
        num_classes = len(index.class_names)
        img_size = (cfg.model.img_size, cfg.model.img_size)

    a = cfg.data.augment
    aug = AugmentConfig(randaug_n=a.randaug_n, randaug_m=a.randaug_m, mixup_alpha=a.mixup_alpha,
                        cutmix_alpha=a.cutmix_alpha, crop_scale=tuple(a.crop_scale), hflip=a.hflip)
    overrides = {} if cfg.model.drop_path_rate is None else {"drop_path_rate": cfg.model.drop_path_rate}
    return ModelSpec.for_data(_M, cfg.model.variant, index, aug, overrides=overrides)


def _weights_of(run_id: str):
    from pipeline.finetune import resolve_source

    return resolve_source(run_id)


def run_workflow(wf: WorkflowConfig, base: Path | None = None) -> dict:
    """Run the chain; returns a summary dict (stage outputs, scores, version, promotion)."""
    import mlflow

    from pipeline import launch
    from pipeline.config import tracking_uri

    uri = tracking_uri(Config(tracking={"tracking_uri": wf.tracking_uri}))
    mlflow.set_tracking_uri(uri)
    if wf.pretrain is None and not wf.pretrained_from:
        raise ConfigError("workflow: set pretrain (a stage) or pretrained_from (a run, model URI or folder)")
    if not wf.finetune:
        raise ConfigError("workflow: finetune needs at least one stage")

    # keys first (cheap): a config error stops the workflow before anything runs
    pre_cfg, pre_key = None, None
    if wf.pretrain is not None:
        pre_cfg, keyed = stage_config(wf.pretrain, wf, base)
        pre_key = key_of("pretrain", keyed)
    else:
        pre_key = key_of("pretrained_from", wf.pretrained_from)
    ft = []
    for i, spec in enumerate(wf.finetune):
        cfg, keyed = stage_config(spec, wf, base)
        ft.append((f"finetune{cfg.model.img_size}" + (f"-{i}" if len(wf.finetune) > 1 else ""), cfg,
                   key_of("finetune", keyed, pre_key)))
    wf_key = key_of(wf.model_dump(mode="json", exclude={"description"}), pre_key, [k for _, _, k in ft])
    book = Book(uri, wf.experiment, wf_key, wf.name)
    _say(f"MLflow parent run {book.parent} ({'continued' if book.resumed else 'new'}) in {uri}")
    ray_tmp: list = []

    def ensure_ray(cfg: Config) -> None:
        """One Ray for every training stage, started only when a stage has to run."""
        if not ray_tmp:
            ray_tmp.append(launch.init_ray(cfg))

    result: dict[str, Any] = {"parent_run_id": book.parent, "stages": {}, "skipped": []}
    current = None
    try:
        # -- pretrain ------------------------------------------------------------------------
        if wf.pretrain is not None:
            done = book.completed(pre_key)
            if done:
                _say(f"pretrain: completed earlier in run {done['run_id']}, skipped")
                result["skipped"].append("pretrain")
            else:
                ensure_ray(pre_cfg)
                done = _training_stage(book, "pretrain", pre_key, pre_cfg, wf)
            result["stages"]["pretrain"] = done
            source_ref = done["run_id"]
        else:
            source_ref = wf.pretrained_from
        from pipeline.finetune import resolve_source

        source = resolve_source(source_ref, tracking_uri=uri)

        # -- finetune (each from the pretrained model) ---------------------------------------
        for stage, cfg, key in ft:
            done = book.completed(key)
            if done:
                _say(f"{stage}: completed earlier in run {done['run_id']}, skipped")
                result["skipped"].append(stage)
            else:
                ensure_ray(cfg)
                done = _training_stage(book, stage, key, cfg, wf, source=source)
            result["stages"][stage] = done

        # -- evaluate: every fine-tuned model (and the pretrained one, resized, untuned) -------
        from pipeline.data import ShardIndex
        from pipeline.registry import evaluate

        val = wf.evaluate.val or result["stages"][ft[-1][0]]["val"]
        val_index = ShardIndex.load(val)
        ev_key = key_of("evaluate", [k for _, _, k in ft], val_index.fingerprint(), wf.evaluate.model_dump())
        done = book.completed(ev_key)
        if done:
            _say(f"evaluate: completed earlier in run {done['run_id']}, skipped")
            result["skipped"].append("evaluate")
        else:
            current = book.open_stage("evaluate", ev_key)
            scores: dict[str, dict] = {}
            for stage, cfg, _ in ft:
                spec = _spec_for(cfg, val_index)
                src = _weights_of(result["stages"][stage]["run_id"])
                model = spec.build()
                model.load_state_dict(src.state_dict)
                scores[stage] = evaluate(model, spec, val, batch_size=wf.evaluate.batch_size)
                if wf.evaluate.baseline and source.num_classes == spec.num_classes:
                    from pipeline.finetune import adapt

                    sd, _ = adapt(source, cfg.model.variant, cfg.model.img_size, spec.num_classes, model=model)
                    model.load_state_dict(sd, strict=False)
                    scores[f"{stage}/pretrained_untuned"] = evaluate(model, spec, val, batch_size=wf.evaluate.batch_size)
                _say(f"evaluate: {stage} top1 {scores[stage]['top1']:.4f}" + (
                    f" (pretrained, resized, not fine-tuned: {scores[f'{stage}/pretrained_untuned']['top1']:.4f})"
                    if f"{stage}/pretrained_untuned" in scores else ""))
            metrics = {f"{s}/{m}".replace("/", "."): v for s, d in scores.items() for m, v in d.items()
                       if isinstance(v, float)}
            book.c.log_batch(current, metrics=[_metric(k, v) for k, v in metrics.items()])
            done = {"val": val, "scores": scores}
            book.complete(current, done)
            done = {"run_id": current, **done}
            current = None
        result["stages"]["evaluate"] = done
        scores = done["scores"]

        # -- register the selected fine-tuned model ------------------------------------------
        names = [s for s, _, _ in ft]
        pick = max(names, key=lambda s: scores[s]["top1"]) if wf.registry.select == "best" else names[-1]
        reg_key = key_of("register", ev_key, pick, wf.registry.name)
        done = book.completed(reg_key)
        if done:
            _say(f"register: version {done['version']} registered earlier, skipped")
            result["skipped"].append("register")
        else:
            current = book.open_stage("register", reg_key)
            cfg = next(c for s, c, _ in ft if s == pick)
            spec = _spec_for(cfg, val_index)
            src = _weights_of(result["stages"][pick]["run_id"])
            done = _register(book, current, spec, src.state_dict, wf, val, pick, result, scores[pick])
            book.complete(current, done)
            done = {"run_id": current, **done}
            current = None
        result["stages"]["register"] = done
        version = done["version"]

        # -- promote --------------------------------------------------------------------------
        if wf.promote.enabled:
            p = wf.promote
            pr_key = key_of("promote", reg_key, p.model_dump())
            done = book.completed(pr_key)
            if done:
                _say(f"promote: decided earlier ({done['action']}), skipped")
                result["skipped"].append("promote")
            else:
                from pipeline.registry import promote

                current = book.open_stage("promote", pr_key)
                d = promote(wf.registry.name, version, val=val, alias=p.alias, margin=p.margin,
                            metric=p.metric, batch_size=wf.evaluate.batch_size)
                for k, v in d.to_dict().items():
                    book.c.set_tag(current, f"promotion.{k}", str(v))
                done = d.to_dict()
                book.complete(current, done)
                done = {"run_id": current, **done}
                current = None
                _say(f"promote: {d.action} (candidate {d.candidate_score}, champion {d.champion_score}); "
                     f"{p.alias} -> version {d.champion_after}")
            result["stages"]["promote"] = done
        book.c.set_tag(book.parent, "workflow.registered_version", str(version))
        book.c.set_terminated(book.parent, "FINISHED")
    except BaseException:
        book.fail(current)
        raise
    finally:
        tmp = ray_tmp[0] if ray_tmp else None
        if tmp:
            import shutil

            import ray

            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _metric(k: str, v: float):
    from mlflow.entities import Metric

    return Metric(k, float(v), int(time.time() * 1000), 0)


def _register(book: Book, run_id: str, spec, state_dict, wf: WorkflowConfig, val: str, stage: str,
              result: dict, score: dict) -> dict:
    """Log the pyfunc model into the register run and create a registry version with lineage tags."""
    import mlflow

    from pipeline.registry import TAG_VAL_DATA, log_model

    tags = {TAG_VAL_DATA: val, "workflow.run": book.parent, "workflow.stage": stage,
            "coatnet.finetune_run": result["stages"][stage]["run_id"], "coatnet.val_top1": f"{score['top1']:.6f}"}
    if "pretrain" in result["stages"]:
        tags["coatnet.pretrain_run"] = result["stages"]["pretrain"]["run_id"]
    with mlflow.start_run(run_id=run_id):
        info, mv = log_model(state_dict, spec, registered_model_name=wf.registry.name, version_tags=tags)
    _say(f"register: {wf.registry.name} version {mv.version} ({stage}, val top1 {score['top1']:.4f})")
    return {"version": str(mv.version), "model_uri": info.model_uri, "name": wf.registry.name, "stage": stage}
