"""MetricsLogger, the rank-0 metric path, against a fake MLflow client whose server can be taken
away: values are kept while it is down and sent, in order and exactly once, when it is back; the
buffer is bounded; the outage is said once each way; close() waits, then counts what it drops.
(The end-to-end version, a real `mlflow server` stopped under a 2-worker run, is
test_resume_rerun.py.)"""
from __future__ import annotations

from pipeline.tracking import MetricsLogger


class FakeClient:
    """MlflowClient.log_batch, with a switch for the server: down raises as a refused connection does."""

    def __init__(self) -> None:
        self.up = True
        self.batches: list[list] = []
        self.calls = 0

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls += 1
        if not self.up:
            raise ConnectionError("Connection refused")
        assert len(metrics) <= 1000                     # MLflow's batch limit is respected
        self.batches.append([(m.key, m.value, m.step) for m in metrics])


def logger(client: FakeClient, lines: list[str], **kw) -> MetricsLogger:
    return MetricsLogger("http://tracking.invalid", "run-1", mlflow_client=client, say=lines.append, **kw)


def sent(client: FakeClient) -> list[tuple]:
    return [m for batch in client.batches for m in batch]


def test_metrics_are_buffered_through_an_outage_and_sent_once_in_order():
    client, lines = FakeClient(), []
    log = logger(client, lines)
    log.log({"train/loss": 2.0}, 1)
    client.up = False
    log.log({"train/loss": 1.5}, 2)
    log.log({"train/loss": 1.2, "train/lr": 0.1}, 3)
    assert sent(client) == [("train/loss", 2.0, 1)] and len(log.pending) == 3
    assert lines == ["tracking server unreachable (ConnectionError); buffering metrics, training goes on"]
    client.up = True
    log.log({"train/loss": 1.0}, 4)
    assert sent(client) == [("train/loss", 2.0, 1), ("train/loss", 1.5, 2), ("train/loss", 1.2, 3),
                            ("train/lr", 0.1, 3), ("train/loss", 1.0, 4)]
    assert log.pending == [] and log.dropped == 0
    assert len(lines) == 2 and lines[1].startswith("tracking server back after")


def test_the_buffer_is_bounded_and_what_it_drops_is_counted():
    client, lines = FakeClient(), []
    log = logger(client, lines, max_pending=5)
    client.up = False
    for step in range(1, 9):
        log.log({"train/loss": float(step)}, step)
    assert log.dropped == 3 and [m.step for m in log.pending] == [4, 5, 6, 7, 8]   # the oldest go first
    client.up = True
    log.flush()
    assert [step for _, _, step in sent(client)] == [4, 5, 6, 7, 8]


def test_large_backlogs_go_in_batches_of_at_most_1000():
    client, lines = FakeClient(), []
    log = logger(client, lines)
    client.up = False
    log.log({f"m{i}": float(i) for i in range(2500)}, 1)
    client.up = True
    assert log.flush()
    assert [len(b) for b in client.batches] == [1000, 1000, 500]


def test_close_waits_for_the_server_then_counts_what_is_left():
    client, lines = FakeClient(), []
    log = logger(client, lines)
    client.up = False
    log.log({"train/loss": 1.0}, 1)
    log.close(timeout_s=0.0)
    assert log.pending == [] and log.dropped == 1
    assert lines[-1] == "1 metric values could not be sent to the tracking server"


def test_other_ranks_and_runs_without_an_id_log_nothing():
    client = FakeClient()
    for log in (MetricsLogger("http://tracking.invalid", "run-1", enabled=False, mlflow_client=client),
                MetricsLogger("http://tracking.invalid", None, mlflow_client=client)):
        log.log({"train/loss": 1.0}, 1)
        log.close(timeout_s=0.0)
        assert log.dropped == 0
    assert client.calls == 0
