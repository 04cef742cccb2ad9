"""End-to-end pretraining on real components: Ray Train v2 workers, DeepSpeed ZeRO-3 on gloo,
loopback S3 (moto), MLflow on SQLite. One shared 2-worker run (module fixture) carries most
assertions: it stores checkpoints on S3 and has one worker SIGKILLed in the middle of a checkpoint save."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import torch
from train_callbacks import override as callbacks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, GLOBAL, MICRO = 8, 16, 8
pytestmark = pytest.mark.slow


def job_cmd(*overrides: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "jobs", "pretrain.py"), *overrides]


def tiny_overrides(data_root: str, storage: str, name: str, uri: str, steps: int = STEPS) -> list[str]:
    return [f"data.root={data_root}", "data.write_demo=false", "data.loader_workers=1",
            "data.augment.crop_scale=[0.8,1.0]",
            "model.variant=coatnet_pico", "model.img_size=32",
            f"train.steps={steps}", f"train.global_batch={GLOBAL}", f"train.micro_batch={MICRO}",
            "train.grad_accum=1", "train.lr=0.003", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=0", "train.checkpoint_every=2", "train.keep_last=2", "train.max_failures=2",
            "scaling.num_workers=2", f"storage.storage_path={storage}", f"storage.name={name}",
            f"tracking.tracking_uri={uri}", "tracking.experiment=test-pretrain",
            "tracking.system_metrics_interval_s=1"]


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process in the session we started (the driver and the local Ray it spawned)."""
    try:
        sid = os.getsid(proc.pid)
    except ProcessLookupError:          # already gone (and reaped)
        proc.wait(timeout=60)
        return
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == sid:
                    os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait(timeout=60)
    remove_ray_files(proc.pid)


def remove_ray_files(driver_pid: int) -> None:
    """The private Ray temp dir of a driver that was killed before it could remove it."""
    for d in glob.glob(f"/tmp/rp{driver_pid}-*"):
        shutil.rmtree(d, ignore_errors=True)


def ride_out(job: subprocess.Popen, log_path, stop, start, seconds: float):
    """Take a service away under a running job for ``seconds`` (``stop()``), bring it back
    (``start()``), wait for the job to finish: (its output, the restarted service). The job must
    still be running during the outage and end with exit code 0."""
    stop()
    time.sleep(seconds)
    assert job.poll() is None, open(log_path).read()[-3000:]
    service = start()
    rc = job.wait(timeout=420)
    out = open(log_path).read()
    assert rc == 0, out[-5000:]
    return out, service


def wait_for(cond, proc: subprocess.Popen, timeout: float = 480, what: str = "") -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


def last_step(keys_dir: str, rank: int) -> int:
    p = os.path.join(keys_dir, f"keys.rank{rank}.jsonl")
    if not os.path.exists(p):
        return 0
    lines = [json.loads(x) for x in open(p).read().splitlines() if x.strip()]
    return lines[-1]["step"] if lines else 0


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from pipeline.data import write_demo_shards

    root = str(tmp_path_factory.mktemp("pretrain_data") / "demo")
    write_demo_shards(root, num_train=256, num_val=64, image_size=32, samples_per_shard=32)
    return root


KILLED_IN_SAVE = 6      # rank 1 dies inside this checkpoint's save; checkpoint 4 is the last complete one


@pytest.fixture(scope="module")
def s3_run(s3_server, demo_root, tmp_path_factory):
    """One 2-worker ZeRO-3 run with checkpoints on S3; rank 1 SIGKILLs itself in the middle of
    checkpoint 6's save (its part written locally, not uploaded; rank 0 uploading its own)."""
    import s3fs

    tmp = tmp_path_factory.mktemp("s3run")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server["endpoint_url"],
           "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint_url"]}
    env.pop("RAY_ADDRESS", None)
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": s3_server["endpoint_url"]})
    bucket = f"pretrain-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    uri = f"sqlite:///{tmp}/mlflow.db"
    keys_dir, dump, marker = str(tmp / "keys"), str(tmp / "live.pt"), str(tmp / "killed.json")
    cmd = job_cmd(*tiny_overrides(demo_root, f"s3://{bucket}/runs", "s3run", uri),
                  callbacks(("KeysLog", {"dir": keys_dir}), ("DumpWeights", {"path": dump}),
                            ("DieDuringSave", {"step": KILLED_IN_SAVE, "rank": 1, "marker": marker})))
    log = open(tmp / "job.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(tmp), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            kill_session(proc)
        log.close()
    out = open(tmp / "job.log").read()
    assert rc == 0, out[-5000:]
    killed = json.load(open(marker))
    assert killed["step"] == KILLED_IN_SAVE and not os.path.exists(killed["folder"])   # the re-run cleared it
    staged = glob.glob(os.path.join(tempfile.gettempdir(), "coatnet-ckpt-s3run-*"))
    assert staged == [], staged       # every local checkpoint folder was removed after its upload
    yield {"out": out, "uri": uri, "fs": fs, "bucket": bucket, "keys_dir": keys_dir, "dump": dump,
           "seconds": time.time() - t0}


def _run(uri):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("test-pretrain")
    runs = c.search_runs([exp.experiment_id])
    return c, runs


def test_run_finishes_with_summary(s3_run):
    out = s3_run["out"]
    assert "== pretraining finished ==" in out
    assert f"steps          {STEPS}" in out
    assert "mlflow ui --backend-store-uri" in out
    print(f"s3 run with one worker killed took {s3_run['seconds']:.0f} s")


def test_zero3_partitions_half_the_parameters(s3_run):
    parts = [json.load(open(f"{s3_run['dump']}.rank{r}.json")) for r in (0, 1)]
    total = parts[0]["total_numel"]
    assert total > 100_000
    for p in parts:
        assert abs(p["partition_numel"] - total / 2) / (total / 2) < 0.05, (p, total)
    assert sum(p["partition_numel"] for p in parts) >= total


def test_mlflow_run_has_params_metrics_and_falling_loss(s3_run):
    c, runs = _run(s3_run["uri"])
    assert len(runs) == 1                       # the restart continued the same run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.variant"] == "coatnet_pico"
    assert not any("testing-secret-key" in v for v in run.data.params.values())
    assert run.data.tags["coatnet.variant"] == "coatnet_pico" and run.data.tags["coatnet.img_size"] == "32"
    hist = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(hist) == list(range(1, STEPS + 1))
    first, last = (hist[1] + hist[2]) / 2, (hist[STEPS - 1] + hist[STEPS]) / 2
    assert last < first, hist
    for name in ("train/lr", "train/grad_norm", "train/images_per_s", "train/samples_seen",
                 "train/skipped_samples", "eval/top1", "eval/top5"):
        assert name in run.data.metrics, name
    assert run.data.metrics["train/samples_seen"] == STEPS * GLOBAL
    assert "system/cpu_utilization_percentage" in run.data.metrics     # MLflow's own monitor
    assert 0 <= run.data.metrics["eval/top1"] <= run.data.metrics["eval/top5"] <= 1
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "weights")}
    assert arts == {"weights/model.safetensors"}


def test_checkpoints_on_s3_keep_last(s3_run):
    fs, b = s3_run["fs"], s3_run["bucket"]
    fs.invalidate_cache()
    cks = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{b}/runs/s3run") if p.rsplit("/", 1)[1].startswith("checkpoint_0"))
    assert cks == ["checkpoint_00000006", "checkpoint_00000008"]
    state = json.loads(fs.cat(f"{b}/runs/s3run/checkpoint_00000008/train_state.json"))
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * GLOBAL
    assert state["loader"]["batches_consumed"] == STEPS and state["config"]["train"]["steps"] == STEPS
    for ck in cks:       # 6 too: the save a kill interrupted was done again whole after the restart
        names = {p.rsplit("/", 1)[1] for p in fs.ls(f"{b}/runs/s3run/{ck}/ds")}
        assert {f"{kind}_rank_{r}_mp_rank_00_{what}_states.pt" for r in (0, 1)
                for kind, what in (("bf16_zero_pp", "optim"), ("zero_pp", "model"))} <= names, (ck, names)


def test_consolidated_fp32_weights_match_live_and_load(s3_run, tmp_path):
    import models

    c, runs = _run(s3_run["uri"])
    from pipeline.weights import load_weights

    path = c.download_artifacts(runs[0].info.run_id, "weights", str(tmp_path))
    sd = load_weights(path)                      # safetensors: nothing is unpickled
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    model = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    live = torch.load(s3_run["dump"], weights_only=True)["params"]
    assert set(live) <= set(sd) and len(live) > 10
    for k, v in live.items():
        assert torch.equal(sd[k].to(v.dtype), v), k     # fp32 master == bf16 live after rounding


def test_worker_kill_resumes_with_data_position(s3_run):
    """Rank 1 died inside checkpoint 6's save: FailureConfig restarted the group from an earlier,
    complete checkpoint (the interrupted one is never resumed from); the steps after it were
    trained again on the SAME keys; no sample lost or doubled. Which earlier one: 4, or 2 when
    Ray's controller had not yet collected every rank's report of checkpoint 4 (it polls the
    workers every 2 s, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; here the kill comes ~0.5 s after that
    report, and 4 of 4 runs resumed from 2)."""
    assert "resumed from step" in s3_run["out"]
    resumed_at = int(s3_run["out"].split("resumed from step ")[1].split()[0])
    assert resumed_at in (KILLED_IN_SAVE - 4, KILLED_IN_SAVE - 2), s3_run["out"][-3000:]
    final: dict[tuple[int, int], list[str]] = {}
    replayed = set()
    for r in (0, 1):
        for line in open(os.path.join(s3_run["keys_dir"], f"keys.rank{r}.jsonl")):
            e = json.loads(line)
            key = (r, e["step"])
            if key in final:
                assert final[key] == e["keys"], f"rank {r} step {e['step']} saw other samples on replay"
                replayed.add(e["step"])
            final[key] = e["keys"]
    assert replayed and min(replayed) == resumed_at + 1
    assert sorted({s for _, s in final}) == list(range(1, STEPS + 1))
    keys = [k for ks in final.values() for k in ks]
    assert len(keys) == STEPS * GLOBAL == len(set(keys))     # none lost, none twice


def test_driver_stop_and_rerun_resumes(demo_root, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = str(tmp_path / "runs")
    keys_dir = str(tmp_path / "keys")
    secret_url = "https://user:hunter2@example.com/d?X-Amz-Credential=AKIAXX&X-Amz-Signature=SECRETSIG"
    cmd = job_cmd(*tiny_overrides(demo_root, storage, "stopme", uri, steps=6),
                  callbacks(("KeysLog", {"dir": keys_dir}), ("StepSleep", {"seconds": 0.5})),
                  f"description=notes at {secret_url}", "train.ema_decay=0.5")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        snapshot = f"{storage}/stopme/checkpoint_manager_snapshot.json"

        def registered() -> int:
            if not os.path.exists(snapshot):
                return 0
            try:
                latest = json.load(open(snapshot)).get("latest_checkpoint_result") or {}
            except ValueError:          # being rewritten
                return 0
            return int(latest.get("metrics", {}).get("step", 0))
        wait_for(lambda: registered() >= 2 and last_step(keys_dir, 0) >= 3, proc,
                 what="first checkpoint: " + open(tmp_path / "first.log").read()[-3000:])
        killed_at = last_step(keys_dir, 0)
    finally:
        kill_session(proc)              # the driver and its private Ray, nothing else
    assert not os.path.exists(f"{storage}/stopme/weights")
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert_console_is_readable(out, steps=6)
    # the killed run's unfinished local checkpoint folders were cleared by the re-run
    assert glob.glob(os.path.join(tempfile.gettempdir(), "coatnet-ckpt-stopme-*")) == []
    resumed_at = int(out.split("resuming stopme from checkpoint_")[1].split()[0])
    assert 2 <= resumed_at < 6 and "steps          6" in out
    steps = [json.loads(x)["step"] for x in open(os.path.join(keys_dir, "keys.rank0.jsonl"))]
    assert len(steps) <= killed_at + 1 + (6 - resumed_at), steps   # a restart from 0 would add 6 lines
    second = steps[len(steps) - (6 - resumed_at):]      # what the re-run trained
    assert second == list(range(resumed_at + 1, 7)) and steps[:resumed_at] == list(range(1, resumed_at + 1)), steps
    state = json.load(open(f"{storage}/stopme/checkpoint_00000006/train_state.json"))
    assert state["step"] == 6 and state["samples_seen"] == 6 * GLOBAL
    kept = sorted(os.path.basename(p) for p in glob.glob(f"{storage}/stopme/checkpoint_0*"))
    assert kept == ["checkpoint_00000004", "checkpoint_00000006"], kept    # keep_last=2 on local storage too
    _, runs = _run(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train/samples_seen"] == 6 * GLOBAL
    # a credential in any URL of the config reaches no param, tag, console line or train state
    logged = [*runs[0].data.params.values(), *runs[0].data.tags.values(), out,
              open(f"{storage}/stopme/checkpoint_00000006/train_state.json").read()]
    for secret in ("hunter2", "SECRETSIG", "AKIAXX"):
        assert not any(secret in text for text in logged), secret
    assert "X-Amz-Signature=***" in runs[0].data.params["description"]

    # EMA (train.ema_decay, kept across the restart): evaluated beside the raw weights, logged whole,
    # and what a run id resolves to (so what the workflow registers) unless asked for the raw weights
    from mlflow.tracking import MlflowClient

    from pipeline.weights import load_weights
    from pipeline.finetune import resolve_source

    run = runs[0]
    assert {"eval/top1", "eval_ema/top1", "eval_ema/loss"} <= set(run.data.metrics)
    c = MlflowClient(uri)
    assert {a.path for a in c.list_artifacts(run.info.run_id, "weights_ema")} == {"weights_ema/model.safetensors"}
    raw, ema = load_weights(f"{storage}/stopme/weights"), load_weights(f"{storage}/stopme/weights_ema")
    assert raw.keys() == ema.keys() and all(raw[k].shape == ema[k].shape for k in raw)
    params = [k for k in raw if k.endswith(("weight", "bias", "relative_position_bias_table"))]
    assert sum(not torch.equal(raw[k], ema[k]) for k in params) > len(params) // 2     # really another model
    import mlflow

    mlflow.set_tracking_uri(uri)
    from_run = resolve_source(run.info.run_id).load()
    assert all(torch.equal(from_run[k], ema[k]) for k in ema)
    assert all(torch.equal(resolve_source(run.info.run_id, ema=False).load()[k], raw[k]) for k in raw)
    import models

    models.create_model("coatnet_pico", num_classes=10, img_size=32).load_state_dict(ema, strict=True)


def assert_console_is_readable(out: str, *, steps: int) -> None:
    """What the terminal of a training job shows: the log file first, then the MLflow run, one
    progress line per log step, the evaluation and the summary - each line once, no library chatter
    (it is in the log file)."""
    lines = [x for x in out.splitlines() if x.strip()]
    assert lines[0].startswith("log file"), lines[:3]
    log_path = lines[0].split(None, 2)[2]
    chatter = open(log_path).read()
    assert "RayTrainWorker" in chatter and "deepspeed" in chatter.lower()   # it went here...
    for noise in ("Warning", "warn(", "RayTrainWorker", "TrainController", "Failed to query", "Traceback",
                  "DeepSpeed", "[rank", "INFO"):
        assert noise not in out, (noise, out[-3000:])                     # ...not to the terminal
    assert len(lines) == len(set(lines)), [x for x in lines if lines.count(x) > 1]
    assert any(x.startswith("MLflow run") for x in lines)
    progress = [x for x in lines if x.startswith("step ")]
    assert progress and progress[-1].startswith(f"step {steps:>6}/{steps}") and "img/s" in progress[-1]
    assert any(x.startswith("eval  step") for x in lines) and "== pretraining finished ==" in lines
