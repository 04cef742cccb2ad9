"""Weighted mixing of several datasets (e.g. JFT 0.7 + ImageNet-21K 0.3) into one training stream.

One ``StreamingLoader`` per source (each keeps its own exact, elastic cursor and its own epochs),
and a deterministic schedule that says, for every micro-batch, which source it comes from: smooth
weighted round-robin over the batch counter. Every rank computes the same schedule, so ranks stay
in step (ZeRO-3 needs equal forwards), and after any n batches the count from source i differs
from n * w_i / sum(w) by less than one batch. A batch holds samples of one source.

    loader = MixedLoader([(index_a, 0.7), (index_b, 0.3)], rank=r, world_size=W, batch_size=B, ...)
    for batch in loader: ...                 # endless: sources wrap into their next epoch
    loader.state_dict() / load_state_dict()  # batch counter + every source's cursor (elastic too)
    loader.source_samples                    # {source name: samples yielded} for logging

Sources must share the label space (same label type and class names, in order); a mismatch is a
DataError naming both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from pipeline.data.index import ShardIndex
from pipeline.data.loader import LoaderStats, StreamingLoader
from pipeline.data.storage import DataError

STATE_VERSION = 1


@dataclass(frozen=True)
class Source:
    name: str
    index: ShardIndex | str
    weight: float


class Schedule:
    """Smooth weighted round-robin: the source of each next batch. Deterministic, and every prefix
    is within one batch of the exact proportions."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights, self.total = list(weights), float(sum(weights))
        self.current = [0.0] * len(self.weights)

    def next(self) -> int:
        self.current = [c + w for c, w in zip(self.current, self.weights)]
        pick = max(range(len(self.weights)), key=lambda i: self.current[i])
        self.current[pick] -= self.total
        return pick


def schedule(weights: Sequence[float], n: int) -> list[int]:
    """The sources of the first ``n`` batches."""
    s = Schedule(weights)
    return [s.next() for _ in range(n)]


class MixedLoader:
    """The StreamingLoader interface the trainer uses, over several weighted sources."""

    def __init__(self, sources: Sequence[Source], **loader_kwargs: Any) -> None:
        if not sources:
            raise DataError("data.sources is empty")
        weights = [float(s.weight) for s in sources]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"data.sources weights must be >= 0 and sum to more than 0, got {weights}")
        self.names = [s.name for s in sources]
        if len(set(self.names)) != len(self.names):
            raise DataError(f"data.sources names must differ, got {self.names}")
        self.weights = weights
        self.loaders = [StreamingLoader(s.index, **loader_kwargs) for s in sources]
        first = self.loaders[0].index
        for name, loader in zip(self.names[1:], self.loaders[1:]):
            idx = loader.index
            if idx.label_type != first.label_type or list(idx.class_names) != list(first.class_names):
                raise DataError(f"data.sources {self.names[0]!r} and {name!r} have different label spaces "
                                f"({first.label_type}, {first.num_classes} classes vs {idx.label_type}, "
                                f"{idx.num_classes} classes): declare one class list for all sources")
        self.batches = 0
        self._schedule = Schedule(weights)
        self._iters: list[Iterator | None] = [None] * len(self.loaders)
        self.source_samples = {n: 0 for n in self.names}
        self.last_source: str | None = None     # the source of the batch yielded last

    @property
    def index(self) -> ShardIndex:
        """The label space (shared by every source)."""
        return self.loaders[0].index

    @property
    def stats(self) -> LoaderStats:
        out = LoaderStats()
        for loader in self.loaders:
            out.samples += loader.stats.samples
            out.batches += loader.stats.batches
            out.skipped += loader.stats.skipped
            out.retries += loader.stats.retries
        return out

    def batch_transform(self):
        return self.loaders[0].batch_transform()

    def _next_from(self, i: int):
        while True:
            if self._iters[i] is None:
                self._iters[i] = iter(self.loaders[i])
            try:
                return next(self._iters[i])
            except StopIteration:            # this source's epoch ended: its next epoch
                self._iters[i] = None

    def __iter__(self) -> Iterator:
        while True:
            i = self._schedule.next()
            batch = self._next_from(i)
            self.batches += 1
            self.source_samples[self.names[i]] += len(batch)
            self.last_source = self.names[i]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "mixture", "batches": self.batches, "names": self.names,
                "weights": self.weights, "source_samples": dict(self.source_samples),
                "sources": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture" or state.get("version") != STATE_VERSION:
            raise ValueError("loader state is not a mixture state of this version")
        if state["names"] != self.names or state["weights"] != self.weights:
            raise ValueError(f"cannot resume a mixture of {state['names']} {state['weights']} as "
                             f"{self.names} {self.weights}")
        for loader, sub in zip(self.loaders, state["sources"]):
            loader.load_state_dict(sub)
        self.batches = int(state["batches"])
        self._schedule = Schedule(self.weights)
        for _ in range(self.batches):           # replay the schedule's position (once, O(steps))
            self._schedule.next()
        self.source_samples = dict(state["source_samples"])
        self._iters = [None] * len(self.loaders)
