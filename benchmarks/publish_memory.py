"""The driver's peak memory and temp-dir disk when a run's final weights are published to MLflow and
the model is registered: the path before issue 21 item 3 ("old", reimplemented here from
`git show 2e0b982:pipeline/launch.py` / `pipeline/registry.py` / `pipeline/workflow.py`) against
today's (`launch._publish_weights`, `finetune.resolve_source` + `registry.log_model(files)`).

    python benchmarks/publish_memory.py --variant coatnet_5            # artifact root on moto S3
    python benchmarks/publish_memory.py --variant coatnet_5 --store local

Synthetic fp32 weights of the variant (1000 classes, 224 px; drawn tensor by tensor from the
meta-device model's shapes, written with `weights.write_weights` as 512 MB shards) stand in for the
final checkpoint's `weights/` export in the run storage. With `--store s3` a moto S3 server (its own
process; objects above 16 MB spill to unlinked files in its temp dir: ~5x the model of disk there
until it stops) carries the run storage and the MLflow artifact root; with `--store local` both are
folders under --workdir. The tracking store is SQLite. The old register step holds several copies
of the model (6x at coatnet_0: ~16 GB of RAM at coatnet_5; run it on an idle machine).
Each step runs in a fresh process (the "driver": torch, mlflow, ray.train and the pipeline imported
first, as in a job, and the tracking store opened) with TMPDIR pointed at a fresh folder; it reports
its peak RSS and peak anonymous RSS above that baseline and the peak bytes in its temp dir, all
sampled every 20 ms. A few tens of MB of the added memory are MLflow's and not the model's: compare
variants to see what grows with the model.

old publish   the weights/ folder copied from storage into a temp dir, `MlflowClient.log_artifacts`
old register  the run's weights/ downloaded, loaded whole (`SourceModel.load`), the network built and
              loaded, weights written to a temp dir, a forward for the signature, `mlflow.pyfunc.log_model`
              (which validates the input example by loading the model once more), registered
new publish   `launch._publish_weights`: storage to the run's artifacts, file by file
new register  `resolve_source(run)` (the artifact read in place) + `registry.log_model(weights URL)`
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
EXPERIMENT = "publish-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_synthetic(url: str, variant: str) -> int:
    """Random fp32 weights of ``variant`` as safetensors shards at ``url``, one tensor at a time."""
    import torch

    import models
    from pipeline.weights import write_weights

    net = models.create_model(variant, num_classes=1000, img_size=224, device="meta")
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, t in net.state_dict().items():
            yield name, (torch.randn(t.shape, generator=gen) if t.dtype.is_floating_point
                         else torch.zeros(t.shape, dtype=t.dtype))
    write_weights(url, tensors())
    return sum(t.numel() for t in net.state_dict().values())


# ---------------------------------------------------------------------------------------------
# The steps, each in a fresh process
# ---------------------------------------------------------------------------------------------

def _old_publish(ctx: dict) -> dict:
    """2e0b982's launch._publish_weights + tracking.finish_run, for a checkpoint with weights/."""
    import pyarrow.fs as pafs

    from pipeline import tracking
    from pipeline.cluster import storage_filesystem

    uri, run_id = ctx["uri"], _new_run(ctx, "old")
    fs, root = storage_filesystem(ctx["checkpoint"])
    out_dir = tempfile.mkdtemp(prefix="weights-")
    try:
        local = os.path.join(out_dir, "weights")
        os.makedirs(local)
        pafs.copy_files(f"{root}/weights", local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        c = tracking.client(uri)
        c.log_artifacts(run_id, local, artifact_path="weights")
        c.set_terminated(run_id, status="FINISHED")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"run_id": run_id}


def _old_register(ctx: dict) -> dict:
    """2e0b982's workflow._register: the run's weights downloaded and loaded, then the in-memory
    registry.log_model of that commit."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow.models import infer_signature
    from pathlib import Path

    from pipeline import registry
    from pipeline.finetune import new_scratch
    from pipeline.weights import check_compatible, load_weights, to_fp32, write_weights

    run_id, spec = ctx["runs"]["old"], _spec(ctx)
    scratch = new_scratch()
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights", dst_path=scratch)
        sd = to_fp32(load_weights(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    net = spec.build()
    check_compatible(sd, net, what="state dict to log")
    net.load_state_dict(sd)
    net.eval()
    with mlflow.start_run(experiment_id=_experiment(ctx)), tempfile.TemporaryDirectory() as tmp:
        wpath, spath = os.path.join(tmp, "weights"), os.path.join(tmp, "spec.json")
        write_weights(wpath, sd.items())
        Path(spath).write_text(json.dumps(spec.to_dict(), indent=1))
        example = pd.DataFrame({"image": [registry._example_png(spec)]})
        wrapper = registry.CoAtNetPyfunc()
        wrapper.model, wrapper.spec, wrapper.device = net, spec, torch.device("cpu")
        signature = infer_signature(example, wrapper.predict(None, example), params={"top_k": 5})
        entry = os.path.join(tmp, "coatnet_pyfunc.py")
        Path(entry).write_text("import mlflow\nfrom pipeline.registry import CoAtNetPyfunc\n\n"
                               "mlflow.models.set_model(CoAtNetPyfunc())\n")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=entry, artifacts={"weights": wpath, "spec": spath},
            code_paths=[os.path.join(ROOT, "models"), os.path.join(ROOT, "pipeline")],
            signature=signature, input_example=example, pip_requirements=registry._requirements(),
            metadata={"coatnet_spec": spec.to_dict()})
    mv = registry.register(info.model_uri, "bench-old")
    return {"version": str(mv.version)}


def _new_publish(ctx: dict) -> dict:
    from ray.train import Checkpoint

    from pipeline import launch
    from pipeline.cluster import storage_filesystem
    from pipeline.config import load_config, resolve_paths

    run_id = _new_run(ctx, "new")
    cfg = resolve_paths(load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        f"storage.storage_path={ctx['storage']}", "storage.name=pub", f"tracking.tracking_uri={ctx['uri']}",
        f"tracking.experiment={EXPERIMENT}"]))
    fs, path = storage_filesystem(ctx["checkpoint"])
    step, weights = launch._publish_weights(cfg, Checkpoint(path, filesystem=fs), run_id, ctx["checkpoint"])
    return {"run_id": run_id, "weights": weights}


def _new_register(ctx: dict) -> dict:
    import mlflow

    from pipeline import registry
    from pipeline.finetune import resolve_source

    with resolve_source(ctx["runs"]["new"], ema=False) as picked, \
            mlflow.start_run(experiment_id=_experiment(ctx)):
        _, mv = registry.log_model(picked.weights, _spec(ctx), registered_model_name="bench-new")
    return {"version": str(mv.version), "read_from": picked.weights}


STEPS = {"old publish": _old_publish, "old register": _old_register,
         "new publish": _new_publish, "new register": _new_register}


def _spec(ctx: dict):
    from pipeline.spec import ModelSpec

    return ModelSpec(variant=ctx["variant"], num_classes=1000, img_size=224)


def _experiment(ctx: dict) -> str:
    import mlflow

    return mlflow.MlflowClient(ctx["uri"]).get_experiment_by_name(EXPERIMENT).experiment_id


def _new_run(ctx: dict, which: str) -> str:
    from pipeline import tracking

    run_id, _ = tracking.get_or_create_run(ctx["uri"], EXPERIMENT, f"{ctx['storage']}/{which}", which, {}, {})
    return run_id


def _measure(step: str, ctx_json: str) -> None:
    import mlflow
    import ray.train  # noqa: F401 - a job's driver has these loaded
    import torch  # noqa: F401

    import pipeline.finetune  # noqa: F401
    import pipeline.launch  # noqa: F401
    import pipeline.registry  # noqa: F401

    ctx = json.loads(ctx_json)
    mlflow.set_tracking_uri(ctx["uri"])
    _experiment(ctx)                   # the store opened (SQLAlchemy, migrations checked) before the baseline
    tmp = tempfile.gettempdir()

    def memory_kb() -> tuple[int, int]:
        """(RSS, anonymous RSS): anonymous is what the process itself holds; RSS adds file pages."""
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])

    def temp_bytes() -> int:
        total = 0
        for d, _, files in os.walk(tmp):
            for f in files:
                try:
                    total += os.lstat(os.path.join(d, f)).st_size
                except OSError:
                    pass
        return total

    base, base_anon = memory_kb()
    peak = {"rss": base, "anon": base_anon, "disk": temp_bytes()}
    base_disk, done = peak["disk"], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            rss, anon = memory_kb()
            peak.update(rss=max(peak["rss"], rss), anon=max(peak["anon"], anon),
                        disk=max(peak["disk"], temp_bytes()))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    out = STEPS[step](ctx)
    seconds = time.time() - t0
    done.set()
    sampler.join()
    print(json.dumps({"step": step, "baseline_mb": base / 1024, "added_mb": (peak["rss"] - base) / 1024,
                      "added_anon_mb": (peak["anon"] - base_anon) / 1024,
                      "temp_mb": (peak["disk"] - base_disk) / 2**20, "seconds": seconds, **out}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="coatnet_5")
    ap.add_argument("--store", choices=("s3", "local"), default="s3",
                    help="run storage and MLflow artifact root: moto S3 (default) or local folders")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temp dir, removed)")
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        _measure(*args._measure)
        return

    work = args.workdir or tempfile.mkdtemp(prefix="publish-bench-")
    env = dict(os.environ, PYTHONPATH=ROOT, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    moto = None
    try:
        if args.store == "s3":
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            moto = subprocess.Popen([sys.executable, "-c", "import time\nfrom moto.server import ThreadedMotoServer\n"
                                     f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}).start()\n"
                                     "time.sleep(10**9)\n"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                       AWS_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                   "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")})
            import s3fs

            fs = s3fs.S3FileSystem()
            for _ in range(100):
                try:
                    fs.mkdir("bench")
                    break
                except Exception:  # noqa: BLE001 - the server is still starting
                    time.sleep(0.1)
            storage, artifacts = "s3://bench/runs", "s3://bench/mlflow"
        else:
            storage, artifacts = os.path.join(work, "runs"), os.path.join(work, "mlartifacts")
        uri = f"sqlite:///{os.path.join(work, 'mlflow.db')}"
        import mlflow

        mlflow.MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=artifacts)
        checkpoint = f"{storage}/pub/checkpoint_00000001"
        t0 = time.time()
        params = _write_synthetic(f"{checkpoint}/weights", args.variant)
        from pipeline.checkpoint import STATE_FILE, TrainState
        import fsspec

        with fsspec.open(f"{checkpoint}/{STATE_FILE}", "w") as f:
            f.write(TrainState(step=1, samples_seen=1, total_steps=1, loader={}, config={}).to_json())
        print(f"{args.variant}: {params / 1e6:.1f} M parameters, {params * 4 / 2**30:.2f} GiB of fp32 weights "
              f"written to {checkpoint} in {time.time() - t0:.0f} s")
        ctx = {"uri": uri, "storage": storage, "checkpoint": checkpoint, "variant": args.variant, "runs": {}}
        rows = []
        for step in STEPS:
            tmp = tempfile.mkdtemp(prefix="driver-tmp-", dir=work)
            r = subprocess.run([sys.executable, __file__, "--_measure", step, json.dumps(ctx)],
                               capture_output=True, text=True, env={**env, "TMPDIR": tmp})
            assert r.returncode == 0, r.stderr[-3000:]
            row = json.loads(r.stdout.strip().splitlines()[-1])
            if "run_id" in row:
                ctx["runs"][step.split()[0]] = row["run_id"]
            rows.append(row)
            shutil.rmtree(tmp, ignore_errors=True)
        fp32 = params * 4 / 2**20
        print(f"\n{args.variant}, artifact root {artifacts} ({args.store}); fp32 model {fp32:.0f} MB\n")
        print("| driver step | baseline RSS MB | peak RSS added MB | anonymous added MB | / model | peak temp-dir MB | / model | s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['step']} | {r['baseline_mb']:.0f} | {r['added_mb']:.0f} | {r['added_anon_mb']:.0f} | "
                  f"{r['added_anon_mb'] / fp32:.2f} | {r['temp_mb']:.0f} | {r['temp_mb'] / fp32:.2f} | {r['seconds']:.1f} |")
    finally:
        if moto is not None:
            moto.kill()
            moto.wait()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
