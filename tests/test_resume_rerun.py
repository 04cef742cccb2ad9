"""A run continues where it stopped after its driver is killed and the same job is run again, and it
rides out its tracking server going away during that re-run. One job, attached to the session's Ray
cluster as a user's re-submitted job would be, tracked on a real ``mlflow server`` (SQLite store,
proxied artifacts), training on a weighted mixture of two datasets.

On a real cluster the tracking server is a service of its own (infra/mlflow) and the workers are on
other hosts; killing the driver ends the job's workers there as here (Ray ends a dead driver's actors)."""
from __future__ import annotations

import glob
import json
import os
import tempfile
import time

import pytest
import torch
from helpers import (GLOBAL, assert_console_is_readable, callbacks, free_port, job_cmd, job_env, kill_session,
                     mlflow_runs, registered_step, ride_out, start_job, start_mlflow_server, step_keys,
                     stop_process_group, tiny_overrides, wait_for)

pytestmark = pytest.mark.slow
STEPS = 10
OUTAGE_S = 6


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two demo datasets with one label space: the training mixture (0.75 / 0.25); val is the first's."""
    from pipeline.data import write_demo_shards

    root = tmp_path_factory.mktemp("resume_data")
    write_demo_shards(str(root / "main"), num_train=256, num_val=64, image_size=32, samples_per_shard=32)
    write_demo_shards(str(root / "other"), num_train=96, num_val=16, image_size=32, samples_per_shard=32, seed=7)
    return str(root / "main"), str(root / "other")


def test_killed_driver_rerun_resumes_through_a_tracking_outage(ray_cluster, two_sources, tmp_path):
    """The driver is SIGKILLed once a checkpoint is registered (Ray then ends the job's workers).
    The same command again resumes from that checkpoint, not from step 0, and finishes the same
    MLflow run; during the re-run the tracking server is stopped for OUTAGE_S seconds: training goes
    on, metrics are buffered and sent when it is back, every step is logged once. The mixture's
    per-source counts survive the stop; the console stays readable; no credential reaches a param, a
    tag, the console or the train state; the EMA is kept across the stop and is what a run resolves to."""
    main, other = two_sources
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    storage = str(tmp_path / "runs")
    keys_dir = str(tmp_path / "keys")
    secret_url = "https://user:hunter2@example.com/d?X-Amz-Credential=AKIAXX&X-Amz-Signature=SECRETSIG"
    mixture = f"data.sources=[{{root: {main}, weight: 0.75, name: main}}, {{root: {other}, weight: 0.25, name: other}}]"
    cmd = job_cmd(*tiny_overrides(main, storage, "stopme", uri, steps=STEPS), mixture,
                  callbacks(("KeysLog", {"dir": keys_dir}), ("StepSleep", {"seconds": 1.0})),
                  f"description=notes at {secret_url}", "train.ema_decay=0.5", "tracking.system_metrics=false")
    env = job_env(ray_cluster)
    try:
        proc = start_job(cmd, env, tmp_path, tmp_path / "first.log")
        try:
            wait_for(lambda: registered_step(f"{storage}/stopme") >= 2 and len(step_keys(keys_dir, 0)) >= 3, proc,
                     what="the first checkpoint")
        finally:
            kill_session(proc)              # the driver; Ray ends the job's actors
        written = -1
        while written != len(step_keys(keys_dir, 0)):   # until the killed job's workers are gone
            written = len(step_keys(keys_dir, 0))
            time.sleep(3)
        killed_at = step_keys(keys_dir, 0)[-1]["step"]
        assert not os.path.exists(f"{storage}/stopme/weights")

        # Ray's record of the run is lost too (the folders copied to other storage): the re-run
        # resumes from the newest complete folder all the same, never from step 0
        os.remove(f"{storage}/stopme/checkpoint_manager_snapshot.json")
        rerun = start_job(cmd, env, tmp_path, tmp_path / "second.log")
        try:
            wait_for(lambda: len(step_keys(keys_dir, 0)) > written, rerun, what="a step of the re-run")

            def back():
                return start_mlflow_server(tmp_path, port)
            out, server = ride_out(rerun, tmp_path / "second.log", lambda: stop_process_group(server), back, OUTAGE_S)
        finally:
            kill_session(rerun)             # a no-op when it has finished

        # the console: readable, and the outage said once each way
        assert_console_is_readable(out, steps=STEPS)
        assert "tracking server unreachable" in out and "buffered metrics sent" in out, out[-3000:]
        # the killed run's unfinished local checkpoint folders were cleared by the re-run
        assert glob.glob(os.path.join(tempfile.gettempdir(), "coatnet-ckpt-stopme-*")) == []

        # resumed from the checkpoint, each step's samples trained once after it
        resumed_at = int(out.split("resuming stopme from checkpoint_")[1].split()[0])
        assert f"checkpoint_{resumed_at:08d} (no Ray snapshot: the newest complete checkpoint folder)" in out
        assert 2 <= resumed_at < STEPS and f"steps          {STEPS}" in out
        steps = [e["step"] for e in step_keys(keys_dir, 0)]
        assert len(steps) <= killed_at + 1 + (STEPS - resumed_at), steps   # a restart from 0 would add STEPS
        second = steps[len(steps) - (STEPS - resumed_at):]                # what the re-run trained
        assert second == list(range(resumed_at + 1, STEPS + 1)), steps
        assert steps[:resumed_at] == list(range(1, resumed_at + 1)), steps
        state = json.load(open(f"{storage}/stopme/checkpoint_{STEPS:08d}/train_state.json"))
        assert state["step"] == STEPS and state["samples_seen"] == STEPS * GLOBAL
        # keep_last=2 of what this Ray run saved; the older folders it never registered stay (up to
        # the resume point), a later one an interrupted save left was removed by the re-run
        kept = sorted(os.path.basename(p) for p in glob.glob(f"{storage}/stopme/checkpoint_0*"))
        older = [f"checkpoint_{s:08d}" for s in range(2, resumed_at + 1, 2)][-2:]
        assert kept == sorted({*older, f"checkpoint_{STEPS - 2:08d}", f"checkpoint_{STEPS:08d}"}), kept

        # one MLflow run: finished, every step logged once (the outage's too), nothing dropped
        c, runs = mlflow_runs(uri)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        logged_steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss"))
        assert logged_steps == list(range(1, STEPS + 1)), logged_steps
        assert "train/dropped_metric_values" not in run.data.metrics
        assert run.data.metrics["train/samples_seen"] == STEPS * GLOBAL
        # the mixture: both sources drawn in proportion to their weights, counted across the stop
        drawn = run.data.metrics["data/main/samples"], run.data.metrics["data/other/samples"]
        assert sum(drawn) == STEPS * GLOBAL and abs(drawn[0] / sum(drawn) - 0.75) <= 1 / STEPS, drawn

        # a credential in any URL of the config reaches no param, tag, console line or train state
        logged = [*run.data.params.values(), *run.data.tags.values(), out,
                  open(f"{storage}/stopme/checkpoint_{STEPS:08d}/train_state.json").read()]
        for secret in ("hunter2", "SECRETSIG", "AKIAXX"):
            assert not any(secret in text for text in logged), secret
        assert "X-Amz-Signature=***" in run.data.params["description"]

        # EMA (train.ema_decay, kept across the stop): evaluated beside the raw weights, logged whole
        # (through the server's artifact proxy), and what a run id resolves to unless asked for the raw
        import mlflow

        import models
        from pipeline.finetune import resolve_source
        from pipeline.weights import load_weights

        assert {"eval/top1", "eval_ema/top1", "eval_ema/loss"} <= set(run.data.metrics)
        assert {a.path for a in c.list_artifacts(run.info.run_id, "weights_ema")} == {"weights_ema/model.safetensors"}
        raw, ema = load_weights(f"{storage}/stopme/weights"), load_weights(f"{storage}/stopme/weights_ema")
        assert raw.keys() == ema.keys() and all(raw[k].shape == ema[k].shape for k in raw)
        params = [k for k in raw if k.endswith(("weight", "bias", "relative_position_bias_table"))]
        assert sum(not torch.equal(raw[k], ema[k]) for k in params) > len(params) // 2     # really another model
        mlflow.set_tracking_uri(uri)
        with resolve_source(run.info.run_id) as from_run, resolve_source(run.info.run_id, ema=False) as raw_run:
            resolved, resolved_raw = from_run.load(), raw_run.load()
        assert all(torch.equal(resolved[k], ema[k]) for k in ema)
        assert all(torch.equal(resolved_raw[k], raw[k]) for k in raw)
        models.create_model("coatnet_pico", num_classes=10, img_size=32).load_state_dict(ema, strict=True)
    finally:
        stop_process_group(server)
