"""How long an elastic run is away when a node dies, and when one joins: ours against Ray Train's
stock elastic restart, on a cluster of several nodes on this machine.

A Ray head and two worker nodes (``ray start --address``, each its own raylet, one worker slot
each) run the tiny 2-worker pretraining job with ``scaling.min_workers=1``. Rank 0 holds after
step 5 (checkpoint 4 registered); node B is then SIGKILLed (raylet and workers, as a machine that
dies). Measured: from the kill to the first step trained again (on one worker, from checkpoint 4).

- ours: ``pipeline.elastic``'s policy waits Ray's node-death detection time after a failure before
  counting the nodes (``scaling.restart_settle_s`` unset), so the dead node is not counted;
- Ray's stock restart (``scaling.restart_settle_s=0``): the nodes are counted at once, the dead one
  still listed, the 2-worker start waits out Ray's 60 s worker-group start timeout, then retries.

The head declares a silent node dead after 3 s here (``RAY_health_check_*``, as the tests'
head); Ray's default is about 15 s, which a real cluster adds to both rows. Run it with nothing
else on the machine; it prints a table.

    python benchmarks/node_failover.py [--rounds 1]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402  (the tests' cluster helpers: the same head and nodes as the rehearsal)
    RayHead,
    callbacks,
    job_cmd,
    job_env,
    registered_step,
    tiny_overrides,
)


def first_step_after(keys_dir: str, t0: float, resumed_from: int) -> float:
    """Seconds from ``t0`` to the first step of the attempt that resumed from ``resumed_from`` (a
    surviving rank of the dead group may still log the step it was in after ``t0``)."""
    times = []
    for path in glob.glob(f"{keys_dir}/keys.rank*.jsonl"):
        times += [r["t"] for r in map(json.loads, Path(path).read_text().splitlines())
                  if r["t"] > t0 and r["start"] == resumed_from]
    return min(times) - t0 if times else float("nan")


def one_run(head: RayHead, data: str, work: Path, settle: str | None) -> float:
    keys_dir, gate = str(work / "keys"), str(work / "gate")
    overrides = [*tiny_overrides(data, str(work / "runs"), "failover", f"sqlite:///{work}/mlflow.db", steps=10),
                 "scaling.num_workers=2", "scaling.min_workers=1", "scaling.resources_per_worker={failover: 1}",
                 "train.max_failures=-1", "train.checkpoint_every=4", "tracking.system_metrics=false",
                 callbacks(("KeysLog", {"dir": keys_dir}), ("Gate", {"step": 5, "rank": 0, "release": gate}))]
    if settle is not None:
        overrides.append(f"scaling.restart_settle_s={settle}")
    nodes = [head.add_node(1, {"failover": 1}) for _ in range(2)]
    job = subprocess.Popen(job_cmd(*overrides), env=job_env(head), cwd=ROOT, stdout=open(work / "job.log", "w"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t_start = time.time()
        while not (os.path.exists(f"{gate}.held") and registered_step(str(work / "runs" / "failover")) == 4):
            if job.poll() is not None or time.time() - t_start > 600:
                raise RuntimeError("the job did not reach step 5:\n" + (work / "job.log").read_text()[-3000:])
            time.sleep(0.2)
        nodes[1].kill()
        t_died = time.time()
        Path(gate).touch()
        if job.wait(timeout=600) != 0:
            raise RuntimeError((work / "job.log").read_text()[-3000:])
        return first_step_after(keys_dir, t_died, resumed_from=4)
    finally:
        if job.poll() is None:
            job.kill()
        for node in nodes:
            node.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each policy (default 1)")
    args = ap.parse_args()
    from pipeline.data import write_demo_shards

    scratch = Path(tempfile.mkdtemp(prefix="coatnet-bench-failover-"))
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    head = RayHead(num_cpus=0)
    try:
        data = str(scratch / "data")
        write_demo_shards(data, num_train=256, num_val=64, image_size=32, samples_per_shard=32)
        rows = []
        for name, settle in (("ours (wait out node-death detection)", None), ("Ray's stock restart", "0")):
            times = []
            for i in range(args.rounds):
                work = scratch / f"{'ours' if settle is None else 'stock'}{i}"
                work.mkdir()
                times.append(one_run(head, data, work, settle))
            rows.append((name, sum(times) / len(times)))
        print(f"\nnode death -> training again (mean of {args.rounds}; node-death detection 3 s)")
        print(f"{'policy':40s} {'seconds':>8s} {'vs ours':>8s}")
        for name, sec in rows:
            print(f"{name:40s} {sec:8.1f} {sec / rows[0][1]:7.2f}x")
    finally:
        head.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
