"""A worker group that cannot be placed fails in time, with one line naming what is missing.

Ray Train v2 waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) for a worker group's placement
group, raises ``WorkerGroupStartupTimeoutError``, and its default failure policy retries that without
limit (``FailureConfig.controller_failure_limit = -1``): a job asking for 64 GPUs on a cluster of 32
waits forever. ``make_failure_policy`` wraps Ray's default policy with a deadline: once the group has
been waiting ``scaling.placement_timeout_s`` in all (attempts after one another, counted from the first
attempt's start), the next failed attempt is final. The driver then turns Ray's error into a
``PlacementError``: the workers asked for, what the cluster's live nodes hold, and the resource that
falls short (``missing``), e.g.

    scaling: 64 workers of {CPU: 8, GPU: 1, accelerator_type:H100: 0.001} not placed within 600 s
    (scaling.placement_timeout_s): the cluster's 5 nodes hold 32 such workers; short of GPU: 64 needed,
    32 on the 4 nodes that have CPU, GPU, accelerator_type:H100

A group that started and failed later resets the clock. Elastic groups (``scaling.min_workers``) are
not started below their minimum at all; they wait for capacity by design (``pipeline.elastic``).
"""
from __future__ import annotations

import math
import os
import time

from pipeline.errors import PipelineError


class PlacementError(PipelineError):
    """Workers the cluster cannot hold (or did not free) within the configured time."""


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def missing(per_worker: dict[str, float], num_workers: int, nodes: list[dict[str, float]]) -> tuple[int, str]:
    """(how many such workers the nodes' total resources hold - each worker on one node -, a phrase
    naming what falls short). Pure: ``nodes`` are the live nodes' total resources. A resource no node
    has is named as such; the others are counted on the nodes that have every resource a worker asks
    for (a GPU of another type does not count)."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    fits = sum(min((math.floor(n.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=num_workers)
               for n in nodes)
    absent = [k for k in need if not any(n.get(k, 0.0) > 0 for n in nodes)]
    if absent:
        return fits, "short of " + "; ".join(f"{k} (no node has it)" for k in absent)
    eligible = [n for n in nodes if all(n.get(k, 0.0) > 0 for k in need)]
    where = ("in the cluster" if len(eligible) == len(nodes) else
             f"on the {len(eligible)} nodes that have {', '.join(need)}")
    short = [f"{k}: {v * num_workers:g} needed, {sum(n[k] for n in eligible):g} {where}"
             for k, v in need.items() if sum(n[k] for n in eligible) + 1e-9 < v * num_workers]
    if short:
        return fits, "short of " + "; ".join(short)
    if fits < num_workers:
        return fits, "the resources are spread over nodes none of which has room for one more worker"
    return fits, "the cluster holds them, but other jobs or actors are using them"


def describe(per_worker: dict[str, float], num_workers: int, timeout_s: float, what: str = "scaling") -> str:
    """The one line for workers that could not be placed, read from the live cluster (driver side)."""
    import ray

    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - the GCS gone as well: say what was asked
        nodes = []
    fits, why = missing(per_worker, num_workers, nodes)
    return (f"{what}: {num_workers} workers of {_fmt(per_worker)} not placed within {timeout_s:g} s "
            f"(scaling.placement_timeout_s): the cluster's {len(nodes)} nodes hold {fits} such workers; {why}")


def placement_failure(error: BaseException, per_worker: dict[str, float], num_workers: int,
                      timeout_s: float) -> PlacementError | None:
    """A PlacementError for Ray Train's placement errors (a start timeout that hit the deadline, an
    infeasible request on an autoscaling cluster); None for any other error."""
    names = {"WorkerGroupStartupTimeoutError", "InsufficientClusterResourcesError"}
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in names:
            return PlacementError(describe(per_worker, num_workers, timeout_s))
        e = getattr(e, "controller_failure", None) or e.__cause__ or e.__context__
    return None


def make_failure_policy(failure_config, timeout_s: float):
    """Ray Train's default failure policy with a placement deadline (``timeout_s``; defined here so
    that importing this module needs no Ray)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import ControllerError

    class PlacementDeadlinePolicy(DefaultFailurePolicy):
        def __init__(self) -> None:
            super().__init__(failure_config)
            self.timeout_s, self.waiting_since = timeout_s, None

        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, ControllerError) and isinstance(
                    training_failed_error.controller_failure, WorkerGroupStartupTimeoutError):
                attempt_s = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
                now = time.monotonic()
                if self.waiting_since is None:      # the first attempt started one timeout ago
                    self.waiting_since = now - attempt_s
                if now - self.waiting_since >= self.timeout_s:
                    return FailureDecision.RAISE
            else:
                self.waiting_since = None           # the group had started: a new wait starts at 0
            return super().make_decision(training_failed_error)

    return PlacementDeadlinePolicy()
