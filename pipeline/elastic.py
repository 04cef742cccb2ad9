"""An elastic group's size: counts that keep the global batch, and growing only after a checkpoint.

With ``scaling.min_workers`` Ray Train's elastic policy (``ScalingConfig(num_workers=(min, max))``)
starts the worker group on as many workers as the cluster's resources hold and restarts it on more
when more appear. Two things it does not know:

- which counts keep ``train.global_batch``: every rank runs the same micro-batch and accumulation,
  so a count must divide the global batch. ``BatchSplittingPolicy`` runs on the largest such count
  not above what Ray finds (``allowed_counts``); below the smallest it waits, as Ray does below
  ``min_workers``. For a power-of-two batch (4096) the counts are powers of two: 64 GPUs less one
  node of 8 run on 32 until the node is back - a batch with more divisors (e.g. 4032) gives finer
  steps.
- that a restart loses every step since the last checkpoint. A shrink comes from a failure (the
  dead workers' group restarts from the last checkpoint; nothing else is possible). A grow is a
  choice: the policy asks the workers (Ray's internal key-value store, key ``grow_key(run)``), they
  checkpoint at their next log step and answer, and only then is the group restarted on more workers.

The policy runs in Ray Train's controller (an actor of the job); the workers' side is
``GrowRequests``, read by rank 0 at log steps.
"""
from __future__ import annotations

import json
import time
import uuid

NAMESPACE = "coatnet"


def allowed_counts(global_batch: int, lo: int, hi: int) -> list[int]:
    """Worker counts in lo..hi that split ``global_batch`` evenly over the ranks (ascending)."""
    return [w for w in range(max(1, lo), hi + 1) if global_batch % w == 0]


def grow_key(run_key: str) -> str:
    return f"grow:{run_key}"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _get(key: str) -> dict | None:
    raw = _kv()._internal_kv_get(key, namespace=NAMESPACE)
    return json.loads(raw) if raw else None


def _put(key: str, value: dict) -> None:
    _kv()._internal_kv_put(key, json.dumps(value), overwrite=True, namespace=NAMESPACE)


def _delete(key: str) -> None:
    _kv()._internal_kv_del(key, namespace=NAMESPACE)


class GrowRequests:
    """The workers' side of the handshake (rank 0 calls it; the others follow its vote)."""

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.answered: str | None = None

    def pending(self) -> dict | None:
        """A request to grow this run's group that nobody answered yet: {"id", "to"}, or None."""
        if self.key is None:
            return None
        request = _get(self.key)
        if request is None or request.get("answered"):
            return None
        return request

    def answer(self, request: dict, step: int) -> None:
        """The checkpoint of ``step`` is reported: the controller may restart the group."""
        _put(self.key, {**request, "answered": True, "step": step})
        self.answered = request["id"]

    def wait_for_restart(self, timeout_s: float, poll_s: float = 0.2) -> None:
        """Wait, after answering, for the controller to stop this group (the process ends here);
        returns when it withdrew its request (the resources went away) or did not act in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            request = _get(self.key)
            if request is None or request.get("id") != self.answered:
                return
            time.sleep(poll_s)


def node_death_detection_s() -> float:
    """How long Ray's GCS takes to declare a node dead that stopped answering (its health-check
    settings, which a cluster may tune through RAY_health_check_* variables), plus one period."""
    try:
        from ray._raylet import Config

        period = Config.health_check_period_ms() / 1000
        return period * (Config.health_check_failure_threshold() + 1)
    except (ImportError, AttributeError):
        return 18.0


def make_policy(scaling_config, *, counts: list[int], key: str, ask_timeout_s: float = 600.0,
                settle_s: float | None = None, say=print):
    """A ``BatchSplittingPolicy`` (defined here so that importing this module needs no Ray); ``say``
    puts a line on the job's console (``TrainTask.say``); ``settle_s``: the wait after a failure
    (None: Ray's node-death detection time)."""
    from ray.train.v2._internal.execution.scaling_policy import (
        ElasticScalingPolicy,
        NoopDecision,
        ResizeDecision,
    )

    class BatchSplittingPolicy(ElasticScalingPolicy):
        """Ray's elastic policy on ``counts`` only, growing through the checkpoint handshake."""

        def __init__(self) -> None:
            super().__init__(scaling_config)
            self.counts, self.key, self.ask_timeout_s = sorted(counts), key, ask_timeout_s
            self.asked_at: float | None = None
            self.answer_seen = self.restarting = False
            self.last_rounded: int | None = None
            # after a failure, wait as long as Ray takes to declare a silent node dead (its health
            # checks: period x failure threshold, 15 s by default) before counting the nodes again;
            # otherwise a dead node is counted and the restart waits out Ray's 60 s start timeout
            self.was_running, self.failed_at = False, float("-inf")
            self.settle_s = node_death_detection_s() if settle_s is None else settle_s

        def _count_possible_workers(self, reserved_resources) -> int:
            # Ray's autoscaling coordinator refreshes its view of the nodes every 20 s: a node that
            # died meanwhile would be counted, the restart would wait on it and time out. Never more
            # than the live nodes hold.
            n = min(super()._count_possible_workers(reserved_resources), self._live_capacity())
            allowed = max((c for c in self.counts if c <= n), default=0)
            if allowed != n and n != self.last_rounded:
                say(f"elastic: resources for {n} workers; running on {allowed or 'none yet'} "
                    f"(counts that split the global batch: {', '.join(map(str, self.counts))})")
            self.last_rounded = n
            return allowed

        def make_decision_for_non_running_worker_group(self):
            self._withdraw()           # a restart is under way anyway (a failure, or a grow we asked for)
            if self.was_running:       # the group just failed: perhaps a node died that Ray still lists
                self.was_running, self.failed_at = False, time.monotonic()
            if time.monotonic() - self.failed_at < self.settle_s:
                return NoopDecision()
            return super().make_decision_for_non_running_worker_group()

        def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
            self.was_running = True
            if self.asked_at is not None:
                request = _get(self.key) or {}
                if not request.get("answered"):
                    if time.monotonic() - self.asked_at > self.ask_timeout_s:
                        self._withdraw()          # the workers never reached a log step: ask again later
                    return NoopDecision()
                if not self.answer_seen:          # one more poll, so that Ray registers the checkpoint
                    self.answer_seen = True
                    return NoopDecision()
                # the request stays until the group is down: its workers wait on it, training nothing
                self.asked_at, self.answer_seen, self.restarting = None, False, True
                target = int(request["to"])
                return ResizeDecision(num_workers=target,
                                      resources_per_worker=self.scaling_config._resources_per_worker_not_none)
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
            if isinstance(decision, ResizeDecision) and decision.num_workers > worker_group_state.num_workers:
                _put(self.key, {"id": uuid.uuid4().hex, "to": decision.num_workers,
                                "from": worker_group_state.num_workers})
                say(f"elastic: resources for {decision.num_workers} workers (running on "
                    f"{worker_group_state.num_workers}): asking for a checkpoint before growing")
                self.asked_at, self.answer_seen = time.monotonic(), False
                return NoopDecision()
            return decision

        def _live_capacity(self) -> int:
            import ray

            per_worker = {k: v for k, v in self.scaling_config._resources_per_worker_not_none.items() if v > 0}
            if not per_worker:
                return self.scaling_config.max_workers
            try:
                nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            except Exception:  # noqa: BLE001 - the GCS busy: Ray's own count stands
                return self.scaling_config.max_workers
            return int(sum(min(res.get(k, 0.0) // v for k, v in per_worker.items()) for res in nodes))

        def _withdraw(self) -> None:
            if self.asked_at is not None or self.restarting:
                _delete(self.key)
            self.asked_at, self.answer_seen, self.restarting = None, False, False

    return BatchSplittingPolicy()
