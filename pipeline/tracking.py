"""MLflow: one run per job, found again by a tag on resume; metrics from rank 0 only.

Run structure (what the fine-tuning/registry stages can rely on):

- experiment ``tracking.experiment``; run name ``tracking.run_name`` (default: ``storage.name``)
- tags: ``coatnet.run_key`` (= "<storage_path>/<name>": a re-run with the same storage path and
  name continues this run), ``coatnet.stage`` ("pretrain"), ``coatnet.variant``,
  ``coatnet.img_size``, ``coatnet.num_classes``, ``mlflow.source.git.commit`` (git sha),
  ``coatnet.checkpoint`` (final Ray checkpoint path), ``coatnet.status``
- params: the resolved config, flattened (``train.lr``...), credentials scrubbed
- metrics (step = optimizer step): train/loss, train/lr, train/grad_norm, train/images_per_s,
  train/samples_seen, train/skipped_samples, eval/top1, eval/top5 (multi-label: eval/precision_at_1,
  eval/top5 = recall@5 of a positive), eval/loss
- system metrics (MLflow's own monitor, from the rank-0 worker): ``system/cpu_utilization_percentage``,
  ``system/system_memory_usage_megabytes``, GPU utilisation and memory when there is a GPU
- artifact ``weights/model.pt``: consolidated fp32 state dict (torch.load(weights_only=True)),
  ``config/resolved.json``
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

RUN_KEY_TAG = "coatnet.run_key"


def git_sha(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or os.path.dirname(__file__),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_or_create_run(uri: str, experiment: str, run_key: str, run_name: str,
                      tags: dict[str, str], params: dict[str, str]) -> tuple[str, bool]:
    """(run_id, resumed). A run tagged with ``run_key`` in the experiment is reused."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    key = run_key.replace("'", "")
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: key})
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id, False


class MetricsLogger:
    """Rank-0 metric logging into an existing run (a no-op on other ranks)."""

    def __init__(self, uri: str, run_id: str | None, enabled: bool = True) -> None:
        self.enabled = enabled and run_id is not None
        self.run_id = run_id
        self._c = client(uri) if self.enabled else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._c.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


class SystemMetrics:
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU when present) logging into
    the run from this process, every ``tracking.system_metrics_interval_s``. A no-op when disabled."""

    def __init__(self, tracking, run_id: str | None, enabled: bool = True) -> None:
        self._monitor = None
        if not (enabled and run_id and tracking.system_metrics):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=tracking.system_metrics_interval_s,
                                                 resume_logging=True, tracking_uri=tracking.tracking_uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - monitoring must never stop training
            print(f"system metrics off: {type(e).__name__}: {e}", flush=True)
            self._monitor = None

    def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def finish_run(uri: str, run_id: str, *, weights_path: str | None, resolved: dict[str, Any],
               tags: dict[str, str], status: str = "FINISHED") -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "resolved.json")
        with open(p, "w") as f:
            json.dump(resolved, f, indent=1)
        c.log_artifact(run_id, p, artifact_path="config")
    if weights_path:
        c.log_artifact(run_id, weights_path, artifact_path="weights")
    c.set_terminated(run_id, status=status)


def ui_hint(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
