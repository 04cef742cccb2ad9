"""Evaluation on the cluster's workers (pipeline.evaluate_ray) against the single-process evaluator:
a real local Ray (2 CPUs, the project's ray_session), a real MLflow SQLite registry, real shards and a
tiny CoAtNet. Same scores, same per-sample keys and hits, same McNemar decision."""
from __future__ import annotations

import pytest
import torch
from helpers import train_tiny

pytestmark = pytest.mark.slow       # starts Ray

VARIANT, IMG = "coatnet_pico", 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.data import write_demo_shards

    root = tmp_path_factory.mktemp("shards")
    write_demo_shards(str(root), num_train=320, num_val=150, image_size=IMG, samples_per_shard=40)
    return root


@pytest.fixture(scope="module")
def registry(shards, tmp_path_factory):
    """Two versions of each of two names (v1: trained 60 steps, v2: 1 step) in a SQLite registry."""
    import mlflow

    from pipeline.registry import log_model

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("eval-ray", artifact_location=str(tmp / "artifacts"))
    mlflow.set_experiment(experiment_id=exp)
    models = [train_tiny(shards, 60, 0), train_tiny(shards, 1, 1)]
    for name in ("local", "cluster"):
        for model, spec in models:
            with mlflow.start_run():
                log_model(model, spec, registered_model_name=name)
    with mlflow.start_run():
        log_model(*models[0], registered_model_name="cli")
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def ray2():
    """The project's private local Ray (2 CPUs, this checkout on the workers' PYTHONPATH)."""
    from pipeline.cluster import ray_session

    with ray_session(2):
        yield


def test_two_workers_give_the_single_process_scores_and_mcnemar_decision(shards, registry, ray2):
    from pipeline.evaluate import evaluate_model
    from pipeline.evaluate_ray import ModelRef, cluster_evaluator, evaluate_on_cluster
    from pipeline.promote import paired_counts, promote
    from pipeline.registry import load_model

    val = str(shards / "val")
    single = {}
    for v in ("1", "2"):
        model, meta = load_model(f"models:/local/{v}")
        single[v] = evaluate_model(model, meta["spec"], val, batch_size=16, per_sample=True)
    # version 1 on the cluster here; both versions again through the promotion gate below
    stats: dict = {}
    dist = evaluate_on_cluster(ModelRef.from_registry("models:/local/1"), val, workers=2,
                               batch_size=16, per_sample=True, stats=stats)
    assert dist["num_samples"] == single["1"]["num_samples"] == 150
    assert dist["top1"] == single["1"]["top1"] and dist["top5"] == single["1"]["top5"]
    assert dist["loss"] == pytest.approx(single["1"]["loss"], rel=1e-5)
    assert dist["correct"] == single["1"]["correct"]          # every key once, same hit
    assert len(stats["parts"]) == 8 and sum(p["keys"] for p in stats["parts"]) == 150
    assert len({p["pid"] for p in stats["parts"]}) == 2       # scored by both workers
    print(f"top1 v1 {single['1']['top1']:.4f}, v2 {single['2']['top1']:.4f}")
    assert single["1"]["top1"] > single["2"]["top1"]
    assert paired_counts(single["1"]["correct"], single["2"]["correct"])[0] > 0   # version 1 right where 2 is not

    # the promotion gate decides the same on either evaluator (v2 champion, v1 the candidate)
    decisions = {}
    for name, evaluator in (("local", None), ("cluster", cluster_evaluator(val, workers=2, batch_size=16))):
        assert promote(name, "2", val=val, evaluator=evaluator).action == "initial"
        decisions[name] = promote(name, "1", val=val, margin=0.01, evaluator=evaluator, batch_size=16)
    a, b = decisions["local"], decisions["cluster"]
    assert (a.action, a.candidate_score, a.champion_score, a.test, a.statistic, a.p_value) == \
        (b.action, b.candidate_score, b.champion_score, b.test, b.statistic, b.p_value)
    assert b.test == "mcnemar-exact" and b.action == "promoted", b


def test_training_precision_and_clear_errors(shards, registry, ray2):
    import models
    from pipeline.data import DataError
    from pipeline.evaluate import evaluate_model
    from pipeline.evaluate_ray import ModelRef, evaluate_on_cluster
    from pipeline.registry import load_model

    val = str(shards / "val")
    model, meta = load_model("models:/local/1")
    single = evaluate_model(model, meta["spec"], val, batch_size=16, precision="bf16")
    dist = evaluate_on_cluster(ModelRef.from_model(model, meta["spec"]), val, workers=2, batch_size=16,
                               precision="bf16")
    assert dist["num_samples"] == 150
    assert abs(dist["top1"] - single["top1"]) <= 2 / 150     # bf16: a tie may fall either way
    assert dist["loss"] == pytest.approx(single["loss"], rel=2e-2)

    # multi-label data: precision_at_1, recall_at_5, loss and the driver-side mAP over the merged outputs
    from pipeline.data import write_demo_shards
    from pipeline.spec import ModelSpec

    multi = shards.parent / "multi"
    write_demo_shards(str(multi), num_train=0, num_val=60, image_size=IMG, samples_per_shard=15, multi_label=True)
    from pipeline.data import ShardIndex

    midx = ShardIndex.load(str(multi / "val"))
    torch.manual_seed(3)
    mmodel = models.create_model(VARIANT, num_classes=midx.num_classes, img_size=IMG).eval()
    mspec = ModelSpec.for_data(mmodel, VARIANT, midx)
    one = evaluate_model(mmodel, mspec, str(multi / "val"), batch_size=16)
    two = evaluate_on_cluster(ModelRef.from_model(mmodel, mspec), str(multi / "val"), workers=2, batch_size=16)
    assert set(two) == set(one) >= {"precision_at_1", "recall_at_5", "loss", "mAP", "num_samples"}
    assert two["num_samples"] == one["num_samples"] == 60
    assert all(two[k] == pytest.approx(one[k], rel=1e-5) for k in one), (one, two)

    # a model of another class count than the data: the worker's DataError arrives as itself, one line
    import dataclasses

    spec5 = dataclasses.replace(meta["spec"], num_classes=5, class_names=[str(i) for i in range(5)])
    small = models.create_model(VARIANT, num_classes=5, img_size=IMG)
    with pytest.raises(DataError, match="10 classes, the model 5"):
        evaluate_on_cluster(ModelRef.from_model(small, spec5), val, workers=2)
    with pytest.raises(ValueError, match="precision"):
        evaluate_on_cluster(ModelRef.from_registry("models:/local/1"), val, precision="fp16")


def test_workers_that_cannot_start_fail_in_time_naming_what_is_missing(shards, registry, ray2):
    import time

    from pipeline.evaluate_ray import ModelRef, evaluate_on_cluster
    from pipeline.placement import PlacementError

    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"evaluation: 2 workers of \{CPU: 1, GPU: 1\} not placed "
                                             r"within 5 s .*short of GPU \(no node has it\)"):
        evaluate_on_cluster(ModelRef.from_registry("models:/local/1"), str(shards / "val"), workers=2,
                            use_gpu=True, start_timeout_s=5)
    assert time.monotonic() - start < 60


def test_promote_job_and_workflow_stage_score_on_the_workers(shards, registry, ray2, tmp_path):
    """jobs/promote.py --workers 2, and the workflow's evaluate stage on a fine-tuning run's weights
    artifact (runs:/ID/weights, read by the workers) in the stage's precision, with the untuned
    baseline resized on the workers."""
    import contextlib
    import importlib.util
    import io
    import json
    from pathlib import Path

    import mlflow

    from pipeline import workflow as wfm
    from pipeline.data import ShardIndex
    from pipeline.evaluate import evaluate_model
    from pipeline.registry import load_model
    import models
    from pipeline.finetune import SourceModel
    from pipeline.weights import adapt_state_dict, write_weights

    val = str(shards / "val")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("job_promote", root / "jobs" / "promote.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = job.main(["--name", "cli", "--val", val, "--workers", "2", "--batch-size", "16",
                       "--tracking-uri", registry])
    assert rc == 0
    d = json.loads(out.getvalue().strip().splitlines()[-1])
    model, meta = load_model("models:/cli/1")
    assert d["action"] == "initial"
    assert d["candidate_score"] == pytest.approx(evaluate_model(model, meta["spec"], val)["top1"], abs=1e-6)

    # the workflow's evaluate stage: a "fine-tuning run" whose weights/ artifact the workers read, and
    # its staged source (a pretrained model at 64 px) which they resize to 32 px themselves: the
    # driver never loads the source (its load() fails here)
    wf, base = wfm.load_workflow("configs/workflow_demo.yaml", [
        "finetune.0.overrides=[model.img_size=32]", "evaluate.baseline=true", "evaluate.batch_size=16",
        f"tracking_uri={registry}"])
    plan = wfm.plan_stages(wf, base)
    stage = plan.finetune[0]
    index = ShardIndex.load(val)
    mspec = wfm.spec_for(stage.config, index)
    tuned = mspec.build()
    tuned.load_state_dict(model.state_dict())
    write_weights(str(tmp_path / "weights"), tuned.state_dict().items())
    source_sd = models.resize_state_dict(model.state_dict(), 64)
    write_weights(str(tmp_path / "init"), source_sd.items())
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "weights"), "weights")
        mlflow.set_tag("coatnet.source_weights", str(tmp_path / "init"))
    result = wfm.WorkflowResult("parent")
    result.stages[stage.name] = wfm.StageResult(stage.name, stage.key, run.info.run_id, {})
    runner = wfm.Runner(None, result)

    class NotOnTheDriver(SourceModel):
        def load(self):
            raise AssertionError("the driver loaded the source")

    source = NotOnTheDriver(kind="weights", ref="pretrained", weights=str(tmp_path / "init"), num_classes=10)
    ev = wfm._evaluate(plan, runner, source, val, index)
    assert stage.config.train.bf16 and stage.config.scaling.num_workers == 2
    single = evaluate_model(tuned, mspec, val, batch_size=16, precision="bf16")
    got = ev["scores"][stage.name]
    assert got["num_samples"] == 150 and abs(got["top1"] - single["top1"]) <= 2 / 150
    resized = mspec.build()
    resized.load_state_dict(adapt_state_dict(resized, source_sd, img_size=32)[0])
    expected = evaluate_model(resized, mspec, val, batch_size=16, precision="bf16")
    untuned = ev["scores"][f"{stage.name}/pretrained_untuned"]
    assert untuned["num_samples"] == 150 and abs(untuned["top1"] - expected["top1"]) <= 2 / 150
    assert untuned["loss"] == pytest.approx(expected["loss"], rel=2e-2)
