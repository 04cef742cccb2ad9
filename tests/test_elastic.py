"""A run that comes back on another number of workers continues: 2 workers -> 1 -> 2, each change
at a checkpoint. The ZeRO-3 model and optimizer state are resharded through DeepSpeed's universal
checkpoint, the global batch is kept (gradient accumulation moves), the data cursor continues the
same epoch, and the MLflow run goes on."""
from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest
import torch
from test_pretrain import GLOBAL, MICRO, _run, job_cmd, tiny_overrides
from train_callbacks import override as callbacks

pytestmark = pytest.mark.slow


def test_resume_on_fewer_then_more_workers(tmp_path):
    from pipeline import checkpoint, weights
    from pipeline.data import write_demo_shards

    data = str(tmp_path / "demo")
    write_demo_shards(data, num_train=256, num_val=64, image_size=32, samples_per_shard=32)
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "runs")
    keys_dir, start_dir = str(tmp_path / "keys"), str(tmp_path / "start")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    outs = []
    for workers, steps in ((2, 4), (1, 8), (2, 12)):
        cmd = job_cmd(*tiny_overrides(data, storage, "elastic", uri, steps=steps),
                      f"scaling.num_workers={workers}", f"train.grad_accum={GLOBAL // (MICRO * workers)}",
                      "train.schedule=constant", "train.warmup_steps=0", "train.checkpoint_every=4",
                      "train.eval_every=0", "train.keep_last=5", "tracking.system_metrics=false",
                      callbacks(("KeysLog", {"dir": keys_dir}), ("StartState", {"dir": start_dir})))
        r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs.append(r.stdout)
    assert "resharded from 2 to 1 workers, grad_accum 2" in outs[1], outs[1]
    assert "resharded from 1 to 2 workers, grad_accum 1" in outs[2], outs[2]
    assert all("universal checkpoint made once per node" in outs[i] for i in (1, 2))
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

    # the streamed consolidation (safetensors shards + index) equals the in-memory one
    streamed = weights.load_weights(weights.consolidate_to(
        f"{storage}/elastic/checkpoint_00000008", str(tmp_path / "w8"), max_shard_bytes=300_000))
    assert len(weights.weight_files(str(tmp_path / "w8"))) > 1            # really sharded
    whole = weights.consolidate(f"{storage}/elastic/checkpoint_00000008")
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)

    # one MLflow run, every step logged once, no jump in the loss at either change
    _, runs = _run(uri)
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
        for line in open(os.path.join(keys_dir, f"keys.rank{r}.jsonl")):
            e = json.loads(line)
            assert (r, e["step"]) not in seen, (r, e["step"])   # no failure, so no replay
            seen[(r, e["step"])] = e["keys"]
    assert sorted({s for _, s in seen}) == list(range(1, 13))
    keys = [k for ks in seen.values() for k in ks]
    assert len(keys) == 12 * GLOBAL == len(set(keys))
