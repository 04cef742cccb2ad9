"""A scale rehearsal on one machine: a job on a cluster of several nodes (the session's Ray head and
worker nodes joined to it with ``ray start --address``, each its own raylet, ports and resources)
that grows when a node joins, shrinks when a node dies, and stops cleanly on SIGTERM - nobody acting
on the job. It is submitted with ``ray job submit`` (token authentication on, the working directory
uploaded), as a user submits to a cluster.

   node A joins ......... 1 worker, steps 1-3 (checkpoints every 2 steps)
   node B joins ......... the controller asks for a checkpoint first (step 3), then restarts on 2 workers
   node B dies .......... after step 8's checkpoint: the group comes back on 1 worker from it
   SIGTERM on rank 0 .... after step 11: that step (or the next) checkpointed, the group restarts from
                          it, nothing lost
   done at step 14 ...... every sample once, the global batch kept throughout

What a real cluster does differently: NCCL instead of gloo between GPU nodes (the loop's reductions
run on the training device; the group has a CPU backend beside), nodes on other hosts (the universal
conversion then runs once on each node, here once per node too), eight or more workers per node, and
Ray's node-death detection at its own settings (here 3 s). The policy, the checkpoint handshake, the
resharding, the SIGTERM path and the data cursor are the code paths run here."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from helpers import GLOBAL, ROOT, callbacks, registered_step, tiny_overrides, wait_for

pytestmark = pytest.mark.slow
STEPS = 14


def submit_cmd(ray_cluster, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """``ray job submit`` of the pretraining job (the CLI follows its output to the end), and its env."""
    cli = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", ray_cluster.dashboard]
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_ADDRESS"}       # the token, not the address
    runtime_env = json.dumps({"excludes": [".git", ".venv", ".cache", "data", "runs", "*.db", "logs"]})
    return cli + ["--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--",
                  "python", "jobs/pretrain.py", *overrides], env


def final_trajectory(keys_dir: str) -> dict[int, list[str]]:
    """Each step's samples as the run finally trained them: where a step was trained more than once
    (steps after the last checkpoint before a node died), the attempt that logged it last."""
    records = []
    for path in glob.glob(f"{keys_dir}/keys.rank*.jsonl"):
        records += [json.loads(line) for line in open(path).read().splitlines() if line.strip()]
    by_step: dict[int, dict[tuple, list[dict]]] = {}
    for r in records:
        by_step.setdefault(r["step"], {}).setdefault((r["start"], r["world"]), []).append(r)
    final = {}
    for step, attempts in by_step.items():
        last = max(attempts.values(), key=lambda rs: max(r["t"] for r in rs))
        final[step] = [k for r in last for k in r["keys"]]
    return final


def test_grow_on_a_new_node_shrink_on_a_dead_one_and_stop_on_sigterm(ray_cluster, demo_shards, tmp_path):
    import models
    from pipeline import checkpoint, weights

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "runs")
    keys_dir, start_dir = str(tmp_path / "keys"), str(tmp_path / "start")
    run_dir = f"{storage}/rehearsal"
    grow_gate, death_gate, sigterm = (str(tmp_path / n) for n in ("grow", "death", "sigterm.json"))
    overrides = [*tiny_overrides(demo_shards, storage, "rehearsal", uri, steps=STEPS),
                 "scaling.num_workers=2", "scaling.min_workers=1", "scaling.resize_check_s=1",
                 "scaling.resources_per_worker={rehearsal: 1}", "train.max_failures=-1",
                 "train.schedule=constant", "train.warmup_steps=0", "train.keep_last=10",
                 "train.ema_decay=0.9", "train.weight_decay=0.05", "tracking.system_metrics=false",
                 callbacks(("KeysLog", {"dir": keys_dir}), ("StartState", {"dir": start_dir}),
                           ("Gate", {"step": 3, "rank": 0, "release": grow_gate}),
                           ("Gate", {"step": 9, "rank": 0, "release": death_gate}),
                           ("SigtermAt", {"step": 11, "rank": 0, "marker": sigterm}))]
    cmd, env = submit_cmd(ray_cluster, overrides)
    denied = subprocess.run(cmd[:5] + ["--no-wait", "--", "python", "-c", "pass"],       # no token: refused
                            env={**{k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"},
                                 "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing_token")},
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and "token" in (denied.stdout + denied.stderr).lower(), denied.stderr[-2000:]
    node_a = ray_cluster.add_node(1, {"rehearsal": 1})
    node_b = None
    log = tmp_path / "job.log"
    job = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        # 1 worker on node A, held after step 3 (checkpoint 2 registered); node B joins meanwhile
        wait_for(lambda: os.path.exists(f"{grow_gate}.held") and registered_step(run_dir) == 2, job,
                 what="step 3 on one worker")
        node_b = ray_cluster.add_node(1, {"rehearsal": 1})
        t_joined = time.time()
        # the controller sees node B and asks the workers for a checkpoint before it grows the group
        wait_for(lambda: "asking for a checkpoint before growing" in log.read_text(), job, timeout=180,
                 what="the grow request")
        open(grow_gate, "w").close()
        # the group grows (after that checkpoint) and reaches step 9, held there; then node B dies
        wait_for(lambda: os.path.exists(f"{death_gate}.held") and registered_step(run_dir) == 8, job,
                 what="step 9 on two workers")
        node_b.kill()
        t_died = time.time()
        open(death_gate, "w").close()
        rc = job.wait(timeout=600)
    finally:
        if job.poll() is None:          # the CLI only follows the job: stop the job itself
            submitted = [w.strip("'") for w in log.read_text().split() if w.startswith("'raysubmit_")]
            if submitted:
                subprocess.run(cmd[:2] + ["stop", "--address", ray_cluster.dashboard, submitted[0]], env=env,
                               capture_output=True, timeout=120)
            job.kill()
        for node in (node_a, node_b):
            if node is not None:
                node.kill()
        full = [w for w in log.read_text().split() if w.endswith(".log") and "coatnet-logs-" in w]
        if full and os.path.exists(full[0]):        # the job's whole log (Ray's lines too), kept with the test's files
            shutil.copy(full[0], tmp_path / "job-full.log")
    out = log.read_text()
    assert rc == 0 and "succeeded" in out and "== pretraining finished ==" in out, out[-5000:]

    # the grow: asked for, checkpointed at the next step, then the restart on two workers from it
    assert "elastic: resources for 2 workers (running on 1): asking for a checkpoint before growing" in out
    assert "step 3: more resources for 2 workers: checkpointing before the group restarts on them" in out, out[-5000:]
    assert f"resumed from step 3 ({3 * GLOBAL} samples seen); resharded from 1 to 2 workers" in out, out[-5000:]
    # the death: the group came back on one worker from checkpoint 8 (step 9 trained again)
    assert f"resumed from step 8 ({8 * GLOBAL} samples seen); resharded from 2 to 1 workers" in out, out[-5000:]
    # SIGTERM after step 11: the step in flight finished (Python runs the handler in the main thread,
    # the loop may have voted on step 11 already), every rank checkpointed it, the restart began there
    assert json.load(open(sigterm))["step"] == 11
    stopped = int(out.split(": SIGTERM reached the group: checkpoint_")[1][:8])
    assert stopped in (11, 12), out[-5000:]
    assert f"resumed from step {stopped} ({stopped * GLOBAL} samples seen)\n" in out, out[-5000:]
    # how long the group was away: node B's join to the first step on two workers, node B's death
    # to the first step on one (what a real cluster adds: its own start and detection times)
    first = {}
    for path in glob.glob(f"{keys_dir}/keys.rank0.jsonl"):
        for r in map(json.loads, open(path).read().splitlines()):
            first.setdefault((r["start"], r["world"]), r["t"])
    print(f"rehearsal: node joined -> training on 2 workers {first[(3, 2)] - t_joined:.1f} s; "
          f"node died -> training on 1 worker {first[(8, 1)] - t_died:.1f} s")

    # every attempt started with the state it should carry: Adam's count and moments, each group's
    # own weight decay, and the EMA re-cut from the saved partitions
    numels = [p.numel() for p in models.create_model("coatnet_pico", num_classes=10, img_size=32).parameters()]
    for resumed_at, ranks, from_world in ((3, (0, 1), 1), (8, (0,), 2), (stopped, (0,), 1)):
        starts = [json.load(open(f"{start_dir}/start.s{resumed_at}.rank{r}.json")) for r in ranks]
        assert all(s["adam_steps"] == [resumed_at] and s["exp_avg_sq_norm"] > 0 for s in starts), starts
        assert all([g["weight_decay"] for g in s["groups"]] == [0.05, 0.0] for s in starts), starts
        assert starts[0]["grad_accum"] * len(ranks) * 8 == GLOBAL                # the global batch kept
        sd = weights.consolidate(f"{run_dir}/checkpoint_{resumed_at:08d}")
        expect = float(sum(v.to(torch.bfloat16).double().pow(2).sum() for k, v in sd.items()
                           if "running" not in k and "num_batches" not in k and "relative_position_index" not in k))
        assert starts[0]["param_sq_sum"] == pytest.approx(expect, rel=1e-3), (starts[0], expect)
        saved = [torch.load(f"{run_dir}/checkpoint_{resumed_at:08d}/ema/rank_{r}.pt", weights_only=True)
                 for r in range(from_world)]
        saved_sq = float(sum(torch.cat([parts[i] for parts in saved])[:n].double().pow(2).sum()
                             for i, n in enumerate(numels)))
        assert saved_sq > 0 and sum(s["ema_sq_sum"] for s in starts) == pytest.approx(saved_sq, rel=1e-6)

    # every sample of the epoch's sequence once, over 1 -> 2 -> 1 workers and four attempts
    final = final_trajectory(keys_dir)
    assert sorted(final) == list(range(1, STEPS + 1))
    assert all(len(ks) == GLOBAL for ks in final.values())
    keys = [k for ks in final.values() for k in ks]
    assert len(keys) == STEPS * GLOBAL == len(set(keys))
    state = json.load(open(f"{run_dir}/checkpoint_{STEPS:08d}/train_state.json"))
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * GLOBAL

    # nothing left behind: no node-local universal folder or staged checkpoint, and no checkpoint
    # folder but the registered ones, the newest complete
    made = checkpoint.node_universal_dir(run_dir, 0).rsplit("-", 1)[0]
    assert not glob.glob(f"{made}-*")
    assert glob.glob(os.path.join(tempfile.gettempdir(), "coatnet-ckpt-rehearsal-*")) == []
    folders = sorted(os.path.basename(p) for p in glob.glob(f"{run_dir}/checkpoint_0*"))
    registered = sorted({2, 3, 4, 6, 8, 10, stopped, 12, 14})                         # keep_last 10
    assert folders == [f"checkpoint_{s:08d}" for s in registered], folders
    assert checkpoint.latest_complete(run_dir).endswith(folders[-1])

    # the final weights: the streamed consolidation (safetensors shards + index) equals the in-memory one
    streamed = weights.load_weights(weights.consolidate_to(
        f"{run_dir}/checkpoint_{STEPS:08d}", str(tmp_path / "w"), max_shard_bytes=300_000))
    assert len(weights.weight_files(str(tmp_path / "w"))) > 1                    # really sharded
    whole = weights.consolidate(f"{run_dir}/checkpoint_{STEPS:08d}")
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)
    assert os.path.exists(f"{run_dir}/weights/model.safetensors")
