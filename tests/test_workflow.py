"""Fine-tuning surgery and the whole workflow on real Ray + DeepSpeed ZeRO-3 + MLflow (SQLite).

- surgery (no Ray): bias tables resized bilinearly, head replaced when the class count changes,
  incompatible sources refused with a clear error;
- end to end: jobs/workflow.py (pretrain 32 px -> fine-tune 64 px -> evaluate -> register ->
  promote) is killed during fine-tuning and run again: pretraining is not repeated, fine-tuning
  resumes from its checkpoint, the chain completes with nested MLflow runs, a registered version
  and the champion alias; fine-tuning beats the pretrained model evaluated at 64 px untuned.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import remove_private_ray

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "coatnet_pico"






# ------------------------------------------------------------------------------------------------
# Stage keys and the stage runner (pure logic, no Ray)

def _plan(**over):
    from pipeline.workflow import WorkflowConfig, plan_stages

    wf = {"name": "k", "pretrain": {"config": "configs/demo.yaml", "overrides": ["train.steps=10"]},
          "finetune": [{"config": "configs/finetune_demo.yaml", "overrides": ["train.steps=5"]}]}
    wf.update(over)
    return plan_stages(WorkflowConfig.model_validate(wf))


def test_stage_keys_follow_what_a_stage_computes():
    base = _plan()
    assert base.key == _plan().key and len(base.key) == 16           # deterministic
    ft_key = base.finetune[0].key
    # another fine-tuning setting: that stage and the workflow change, pretraining does not
    other_ft = _plan(finetune=[{"config": "configs/finetune_demo.yaml", "overrides": ["train.steps=6"]}])
    assert other_ft.pretrain_key == base.pretrain_key and other_ft.finetune[0].key != ft_key
    assert other_ft.key != base.key
    # another pretraining: every stage that consumes it changes too
    other_pre = _plan(pretrain={"config": "configs/demo.yaml", "overrides": ["train.steps=11"]})
    assert other_pre.pretrain_key != base.pretrain_key and other_pre.finetune[0].key != ft_key
    # where results are stored or tracked, probes and the description change nothing computed
    same = _plan(storage_path="/elsewhere", tracking_uri="sqlite:////tmp/x.db", experiment="e2",
                 description="words",
                 pretrain={"config": "configs/demo.yaml", "overrides": [
                     "train.steps=10", 'train.callbacks=[{"target": "tests.train_callbacks:StepSleep", '
                     '"kwargs": {"seconds": 1}}]']})
    assert same.pretrain_key == base.pretrain_key and same.finetune[0].key == ft_key
    # stage names carry the resolution, indexed when several fine-tunings run
    two = _plan(finetune=[{"config": "configs/finetune_demo.yaml"}, {"config": "configs/finetune_demo.yaml",
                                                                       "overrides": ["model.img_size=96"]}])
    assert [stage.name for stage in two.finetune] == ["finetune64-0", "finetune96-1"]


def test_workflow_config_errors():
    from pipeline.config import ConfigError
    from pipeline.workflow import load_workflow

    with pytest.raises(ConfigError, match="set pretrain"):
        _plan(pretrain=None)
    with pytest.raises(ConfigError, match="at least one stage"):
        _plan(finetune=[])
    with pytest.raises(ConfigError, match="promote.metric"):
        load_workflow(None, ["promote.metric=accuracy"])


def test_runner_runs_a_stage_once_then_skips_it(mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.workflow import Book, Runner, WorkflowResult

    calls = []

    def body(run_id):
        calls.append(run_id)
        return {"answer": 42}

    for attempt in range(2):
        book = Book(mlflow_uri, "runner-test", "wf-key", "t")
        result = WorkflowResult(book.parent)
        out = Runner(book, result).stage("evaluate", "stage-key", body)
        assert out == {"answer": 42}
        assert result.stages["evaluate"].skipped is (attempt == 1)
    assert len(calls) == 1 and book.resumed
    c = MlflowClient(mlflow_uri)
    run = c.get_run(calls[0])
    assert run.data.tags["workflow.status"] == "completed" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == book.parent
    assert result.to_dict()["stages"]["evaluate"]["answer"] == 42 and result.skipped == ["evaluate"]

    def broken(run_id):
        raise RuntimeError("boom")

    book = Book(mlflow_uri, "runner-test", "wf-key-2", "t")
    with pytest.raises(RuntimeError):
        Runner(book, WorkflowResult(book.parent)).stage("register", "other-key", broken)
    assert c.get_run(book.parent).info.status == "FAILED"
    assert book.completed("other-key") is None


# ------------------------------------------------------------------------------------------------

def _workflow_config(tmp: Path, uri: str) -> Path:
    data = str(tmp / "data")
    common = [f"data.root={data}", "data.demo_image_size=64", "data.demo_num_train=800",
              "data.demo_num_val=200", "data.write_demo=true"]
    wf = {
        "name": "t",
        "tracking_uri": uri,
        "experiment": "wf-test",
        "storage_path": str(tmp / "runs"),
        "pretrain": {"config": "configs/demo.yaml",
                     "overrides": common + ["train.steps=60", "train.eval_every=0", "train.checkpoint_every=0"]},
        "finetune": [{"config": "configs/finetune_demo.yaml",
                      "overrides": common + ["train.steps=24", "train.checkpoint_every=8",
                                             "train.lr=1e-3", "train.min_lr=1e-3"]}],
        # in the driver here: the stage's scoring on the workers is test_evaluate_ray's (one job less to start)
        "evaluate": {"batch_size": 100, "workers": 0},
        "registry": {"name": "coatnet-wf"},
    }
    p = tmp / "wf.yaml"
    p.write_text(yaml.safe_dump(wf))
    return p


def _start(cfg: Path, uri: str, cwd: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "workflow.py"), "--config", str(cfg),
                             "--summary", str(cwd / "summary.json")],
                            cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)   # its own process group: we kill only it


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    remove_private_ray(proc.pid)


@pytest.mark.slow
def test_workflow_end_to_end_killed_and_resumed(tmp_path, mlflow_uri):
    import mlflow

    cfg = _workflow_config(tmp_path, mlflow_uri)
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"

    # run 1: kill the whole process tree once fine-tuning has written a checkpoint
    proc = _start(cfg, mlflow_uri, tmp_path, log1)
    try:
        deadline = time.time() + 420
        ck = []
        while time.time() < deadline and proc.poll() is None:
            ck = list((tmp_path / "runs").glob("t-finetune64-*/checkpoint_*/train_state.json"))
            if ck:
                break
            time.sleep(1)
        assert ck, f"no fine-tuning checkpoint (rc={proc.poll()}):\n" + log1.read_text()[-4000:]
    finally:
        _kill_group(proc)
    assert "pretrain: Ray run" in log1.read_text()
    import glob
    import tempfile

    from pipeline.finetune import SCRATCH_PREFIX
    # the pretraining run's weights are read where MLflow keeps them: no download, nothing left
    # (removing what a killed driver downloaded: test_finetune.py)
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"{SCRATCH_PREFIX}{proc.pid}-*"))

    # run 2: the same command completes; pretraining is not repeated, fine-tuning resumes
    proc = _start(cfg, mlflow_uri, tmp_path, log2)
    try:
        rc = proc.wait(timeout=420)
    finally:
        _kill_group(proc)
    out = log2.read_text()
    assert rc == 0, out[-5000:]
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"{SCRATCH_PREFIX}{proc.pid}-*"))
    assert "pretrain: completed earlier" in out and "pretrain: Ray run" not in out
    assert "resumed from step" in out, out[-5000:]
    resumed_at = int(out.split("resumed from step")[1].split()[0])
    assert 8 <= resumed_at < 24

    summary = json.loads((tmp_path / "summary.json").read_text())
    mlflow.set_tracking_uri(mlflow_uri)
    c = mlflow.MlflowClient()
    exp = c.get_experiment_by_name("wf-test")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("workflow.stage"), []).append(r)
    parent = summary["parent_run_id"]
    assert [r.info.run_id for r in runs if "workflow.key" in r.data.tags] == [parent]
    for stage in ("pretrain", "finetune64", "evaluate", "register", "promote"):
        assert len(by_stage.get(stage, [])) == 1, (stage, {k: len(v) for k, v in by_stage.items()})
        r = by_stage[stage][0]
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.tags["workflow.status"] == "completed"
    pre, ft = by_stage["pretrain"][0], by_stage["finetune64"][0]
    assert ft.data.tags["coatnet.parent_run"] == pre.info.run_id
    assert ft.data.tags["coatnet.source"] == pre.info.run_id
    assert ft.data.tags["coatnet.img_size"] == "64" and pre.data.tags["coatnet.img_size"] == "32"
    assert c.get_run(parent).info.status == "FINISHED"

    # registered and promoted
    mv = c.get_model_version_by_alias("coatnet-wf", "champion")
    assert str(mv.version) == "1" and mv.tags["promotion.decision"] == "initial"
    assert mv.tags["coatnet.finetune_run"] == ft.info.run_id

    # fine-tuning at 64 px beats the pretrained model resized to 64 px without fine-tuning
    scores = summary["stages"]["evaluate"]["scores"]
    tuned, untuned = scores["finetune64"]["top1"], scores["finetune64/pretrained_untuned"]["top1"]
    print(f"val top1 @64px: pretrained untuned {untuned:.4f}, fine-tuned {tuned:.4f}; "
          f"pretrain @32px {pre.data.metrics.get('eval/top1')}")
    assert tuned > untuned + 0.05, scores

    # the ZeRO-3 checkpoint of pretraining consolidates to the logged fp32 weights
    from pipeline.finetune import resolve_source

    from_folder = resolve_source(str(tmp_path / "runs" / Path(pre.data.tags["coatnet.storage"]).name))
    from_run = resolve_source(pre.info.run_id)
    assert from_folder.kind == "checkpoint" and from_folder.variant == VARIANT and from_folder.img_size == 32
    folder_sd, run_sd = from_folder.load(), from_run.load()
    assert folder_sd.keys() == run_sd.keys()
    assert all(torch.equal(folder_sd[k], run_sd[k]) for k in run_sd)
    scratch = from_folder.scratch          # the streamed consolidation's files, removed on close
    assert scratch and os.path.isdir(scratch)
    from_folder.close()
    assert not os.path.exists(scratch)
    champ = resolve_source("models:/coatnet-wf@champion")
    assert champ.kind == "registry" and champ.img_size == 64 and champ.parent_run_id

    # run 3: everything is done - all stages skipped, nothing changes
    proc = _start(cfg, mlflow_uri, tmp_path, tmp_path / "run3.log")
    try:
        assert proc.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    finally:
        _kill_group(proc)
    again = json.loads((tmp_path / "summary.json").read_text())
    assert set(again["skipped"]) == {"pretrain", "finetune64", "evaluate", "register", "promote"}
    assert len(c.search_runs([exp.experiment_id], max_results=100)) == len(runs)
    assert len(c.search_model_versions("name='coatnet-wf'")) == 1
