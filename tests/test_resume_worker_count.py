"""A run that comes back on another number of workers continues: 2 workers -> 1 -> 2, each change
at a checkpoint. The ZeRO-3 model and optimizer state are resharded through DeepSpeed's universal
checkpoint, the global batch is kept (gradient accumulation moves), the data cursor continues the
same epoch, and the MLflow run goes on. The first run is submitted with ``ray job submit`` to the
session's Ray head (token authentication on, the working directory uploaded), as a user submits to
a cluster; the re-runs attach to it through RAY_ADDRESS.

On a real cluster a re-run on fewer workers usually means fewer nodes (NCCL instead of gloo, the
universal conversion made once per node rather than once for the one node here); the resharding,
the batch arithmetic and the data cursor are the code paths run here."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (GLOBAL, MICRO, ROOT, callbacks, job_cmd, job_env, mlflow_runs, run_job, step_keys,
                     tiny_overrides)

pytestmark = pytest.mark.slow


def submit(ray_cluster, overrides: list[str], tmp_path) -> str:
    """``ray job submit`` of the pretraining job, as a user runs it; its output."""
    cli = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", ray_cluster.dashboard]
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_ADDRESS"}       # the token, not the address
    denied = subprocess.run(cli + ["--no-wait", "--", "python", "-c", "pass"],     # no token: refused
                            env={**{k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"},
                                 "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing_token")},
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and "token" in (denied.stdout + denied.stderr).lower(), denied.stderr[-2000:]
    runtime_env = json.dumps({"excludes": [".git", ".venv", ".cache", "data", "runs", "*.db", "logs"]})
    r = subprocess.run(cli + ["--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--",
                              "python", "jobs/pretrain.py", *overrides],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out and "== pretraining finished ==" in out, out[-4000:]
    return out


def test_resume_on_fewer_then_more_workers(ray_cluster, demo_shards, tmp_path):
    import models
    from pipeline import checkpoint, weights

    data = demo_shards
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "runs")
    keys_dir, start_dir = str(tmp_path / "keys"), str(tmp_path / "start")
    sigterm = str(tmp_path / "sigterm.json")
    outs = []
    for workers, steps in ((2, 4), (1, 8), (2, 12)):
        probes = [("KeysLog", {"dir": keys_dir}), ("StartState", {"dir": start_dir})]
        if steps == 12:             # a SIGTERM reaches rank 1 after step 10 (a reclaimed spot node)
            probes.append(("SigtermAt", {"step": 10, "rank": 1, "marker": sigterm}))
        overrides = [*tiny_overrides(data, storage, "elastic", uri, steps=steps),
                     f"scaling.num_workers={workers}",        # the one knob: accumulation follows
                     "train.schedule=constant", "train.warmup_steps=0", "train.checkpoint_every=4",
                     "train.eval_every=0", "train.keep_last=5", "tracking.system_metrics=false",
                     "train.ema_decay=0.9", "train.weight_decay=0.05", callbacks(*probes)]
        if not outs:
            outs.append(submit(ray_cluster, overrides, tmp_path))
            assert os.path.exists(f"{storage}/elastic/weights/model.safetensors")
            # Ray's record of the run is lost (folders copied elsewhere): the re-run still resumes
            os.remove(f"{storage}/elastic/checkpoint_manager_snapshot.json")
        else:
            outs.append(run_job(job_cmd(*overrides), job_env(ray_cluster), tmp_path, tmp_path / f"run-{workers}.log"))
    assert "resuming elastic from checkpoint_00000004 (no Ray snapshot" in outs[1], outs[1]
    assert "resharded from 2 to 1 workers, grad_accum 2" in outs[1], outs[1]
    assert "resharded from 1 to 2 workers, grad_accum 1" in outs[2], outs[2]
    assert all("universal checkpoint made once per node" in outs[i] for i in (1, 2))
    # SIGTERM on one rank: the step in flight finished, every rank checkpointed it and stopped, and
    # the group came back from that very step (no step trained twice: the key log below)
    stopped_at = json.load(open(sigterm))["step"]
    term_ck = next(int(line.split("checkpoint_")[1][:8]) for line in outs[2].splitlines()
                   if "SIGTERM reached the group" in line)
    assert term_ck in (stopped_at, stopped_at + 1), outs[2]
    assert all(os.path.exists(f"{start_dir}/start.s{term_ck}.rank{r}.json") for r in (0, 1)), outs[2]
    made = checkpoint.node_universal_dir(f"{storage}/elastic", 0).rsplit("-", 1)[0]
    assert not glob.glob(f"{made}-*")                                       # removed after loading

    for resumed_at, ranks, from_world in ((4, (0,), 2), (8, (0, 1), 1)):
        starts = [json.load(open(f"{start_dir}/start.s{resumed_at}.rank{r}.json")) for r in ranks]
        # the optimizer state came along: Adam has counted every earlier step, its moments are not zero
        assert all(s["adam_steps"] == [resumed_at] and s["exp_avg_sq_norm"] > 0 for s in starts), starts
        assert starts[0]["grad_accum"] == GLOBAL // (MICRO * len(ranks))
        # ...and so did the weights: equal to the checkpoint's (fp32 master rounded to bf16)
        sd = weights.consolidate(f"{storage}/elastic/checkpoint_{resumed_at:08d}")
        expect = float(sum(v.to(torch.bfloat16).double().pow(2).sum() for k, v in sd.items()
                           if "running" not in k and "num_batches" not in k and "relative_position_index" not in k))
        assert starts[0]["param_sq_sum"] == pytest.approx(expect, rel=1e-3), (starts[0], expect, from_world)
        # every parameter group keeps its own hyperparameters (DeepSpeed's universal load copies group
        # 0's into all: norms, biases and bias tables would be decayed from the first reshard on)
        assert all([g["weight_decay"] for g in s["groups"]] == [0.05, 0.0] for s in starts), starts
        # the EMA came along too, re-cut to the new partitioning: each parameter put together from the
        # saved partitions (padding past its size dropped) has the squares the new partitions hold
        saved = [torch.load(f"{storage}/elastic/checkpoint_{resumed_at:08d}/ema/rank_{r}.pt", weights_only=True)
                 for r in range(from_world)]
        numels = [p.numel() for p in models.create_model("coatnet_pico", num_classes=10, img_size=32).parameters()]
        saved_sq = float(sum(torch.cat([parts[i] for parts in saved])[:n].double().pow(2).sum()
                             for i, n in enumerate(numels)))
        assert saved_sq > 0 and sum(s["ema_sq_sum"] for s in starts) == pytest.approx(saved_sq, rel=1e-6)

    # the streamed consolidation (safetensors shards + index) equals the in-memory one
    streamed = weights.load_weights(weights.consolidate_to(
        f"{storage}/elastic/checkpoint_00000008", str(tmp_path / "w8"), max_shard_bytes=300_000))
    assert len(weights.weight_files(str(tmp_path / "w8"))) > 1            # really sharded
    whole = weights.consolidate(f"{storage}/elastic/checkpoint_00000008")
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)

    # one MLflow run, every step logged once, no jump in the loss at either change
    _, runs = mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    hist = {m.step: m.value for m in MlflowClient(uri).get_metric_history(runs[0].info.run_id, "train/loss")}
    assert sorted(hist) == list(range(1, 13)), hist
    for at in (4, 8):
        assert abs(hist[at + 1] - hist[at]) < 0.25 * hist[at], hist
    assert runs[0].data.metrics["train/samples_seen"] == 12 * GLOBAL

    # sample accounting: every step's samples once, across all three worker counts
    seen: dict[tuple[int, int], list[str]] = {}
    for r in (0, 1):
        for e in step_keys(keys_dir, r):
            assert (r, e["step"]) not in seen, (r, e["step"])   # no failure, so no replay
            seen[(r, e["step"])] = e["keys"]
    assert sorted({s for _, s in seen}) == list(range(1, 13))
    keys = [k for ks in seen.values() for k in ks]
    assert len(keys) == 12 * GLOBAL == len(set(keys))
