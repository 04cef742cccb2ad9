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
- artifact ``weights/``: the fp32 weights as safetensors (``model.safetensors``, or shards
  and ``model.safetensors.index.json``; ``pipeline.weights.load_weights`` reads either), copied by
  the driver from the final checkpoint in storage straight into the run's artifact location
  (``weights.copy_to_artifacts``: never staged on the driver where that location is storage it
  reaches; one shard at a time through the tracking server's proxy otherwise);
  ``weights_ema/`` the same for the EMA model when ``train.ema_decay`` is set,
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
    from pipeline.redact import redact, redact_values

    key = redact(run_key.replace("'", ""))
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags=redact_values({**tags, RUN_KEY_TAG: key}))
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id, False


class MetricsLogger:
    """Rank-0 metric logging into an existing run (a no-op on other ranks) that survives a tracking
    server outage: values that cannot be sent are kept (up to ``max_pending``, the oldest dropped
    and counted beyond that) and sent with the next call that gets through. Training never waits
    on the server: each attempt is one quick request (``fast_fail_env``)."""

    def __init__(self, uri: str, run_id: str | None, enabled: bool = True, max_pending: int = 200_000,
                 say=print, mlflow_client=None) -> None:
        """``mlflow_client``: an MlflowClient (default: one for ``uri``)."""
        self.enabled = enabled and run_id is not None
        self.run_id = run_id
        self._c = (mlflow_client or client(uri)) if self.enabled else None
        self.pending: list = []
        self.dropped = 0
        self.max_pending = max_pending
        self._say = say
        self._down_since: float | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.flush()

    def flush(self) -> bool:
        """Send what is pending; False while the server is unreachable."""
        import time

        if not self.enabled or not self.pending:
            return True
        try:
            while self.pending:
                self._c.log_batch(self.run_id, metrics=self.pending[:1000])   # MLflow's batch limit
                del self.pending[:1000]
        except Exception as e:  # noqa: BLE001 - any failure to reach the server: keep and go on
            if len(self.pending) > self.max_pending:
                extra = len(self.pending) - self.max_pending
                del self.pending[:extra]
                self.dropped += extra
            if self._down_since is None:
                self._down_since = time.time()
                self._say(f"tracking server unreachable ({type(e).__name__}); buffering metrics, training goes on")
            return False
        if self._down_since is not None:
            self._say(f"tracking server back after {time.time() - self._down_since:.0f} s; buffered metrics sent")
            self._down_since = None
        return True

    def close(self, timeout_s: float) -> None:
        """Last flush, retried for up to ``timeout_s``; what is still pending then is counted as
        dropped, and the count is logged once the server answers."""
        import time

        deadline = time.time() + timeout_s
        while not self.flush() and time.time() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.time())))
        if self.pending:
            self.dropped += len(self.pending)
            self.pending.clear()
        if self.dropped:
            self._say(f"{self.dropped} metric values could not be sent to the tracking server")


def fast_fail_env() -> None:
    """MLflow's HTTP client retries a failed request for minutes by default; in a training worker
    one short attempt is right (MetricsLogger keeps what was not sent). Unless the user set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


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


def finish_run(uri: str, run_id: str, *, resolved: dict[str, Any], tags: dict[str, str],
               status: str = "FINISHED") -> None:
    """Tags, ``config/resolved.json`` and the end status. The weights are not logged here: the driver
    copies them from storage into the run's artifact location first (``launch``, ``weights.copy_to_artifacts``)."""
    from pipeline.redact import redact

    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, redact(str(v)))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "resolved.json")
        with open(p, "w") as f:
            json.dump(resolved, f, indent=1)
        c.log_artifact(run_id, p, artifact_path="config")
    c.set_terminated(run_id, status=status)


def ui_hint(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
