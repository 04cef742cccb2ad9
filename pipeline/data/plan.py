"""Epoch planning: which samples each (rank, stream) reads in an epoch, in which order, and how an
interrupted epoch continues at another world size or worker count.

Planning (the same pure function on every rank, vectorised with numpy, run once per epoch in the
rank's main process; each DataLoader worker receives only its own stream's plan and shard rows):

- finite epoch: the shards are permuted with ``(seed, epoch)``; their samples, concatenated, form
  one sequence of N global positions. Rank r takes a contiguous slice of ``N // W`` or
  ``N // W + 1`` samples and splits it into ``L = ceil(ceil(N / W) / B)`` batches on EVERY rank:
  full batches first, the deficit taken from the last batches (so a rank's last batches may be
  short by a few samples; none is empty). Every sample is read exactly once and every rank yields
  exactly L batches - neither padding nor dropping. (``drop_last=True`` instead yields only full
  batches, ``N // (W * B)`` per rank, leaving the epoch's tail unread.)
- a rank's batch j belongs to its stream ``j % K`` (K = DataLoader workers, or 1 without
  workers), matching the DataLoader's round-robin; stream k reads a contiguous slice of the rank's
  samples, so each shard is streamed sequentially by one reader (two at slice boundaries).
- resampled mode (``samples_per_epoch``): each stream draws whole shards with replacement
  (probability proportional to their sample count) from ``(seed, epoch, rank, stream)``, as many
  as its batches need; every rank yields ``samples_per_epoch // (W * B)`` full batches.

Within a stream, the read order is shuffled with a shuffle buffer that runs on sample POSITIONS
(known from the index) rather than on data: the order a stream yields is a pure function of the
plan, so ``consumed[k]`` (batches of stream k handed to the trainer, the same on every rank)
tells exactly which positions were consumed. On resume they are not decoded again: shards whose
samples were all consumed are not opened. Augmentation randomness is seeded per batch, so a
resumed epoch yields the same batches an uninterrupted one would have.

Elastic resume (another world size or worker count mid-epoch; docs/DESIGN.md has the proof
sketch): the state lists the epoch's GENERATIONS, one per plan the epoch ran under, each with its
world size, streams, shuffle buffer and per-stream consumed counts. Generation 0 plans over the
epoch's full sequence R0; generation g+1 plans, exactly as above, over R(g+1) = R(g) minus the
positions generation g consumed, in R(g)'s order. A position of R(g+1) is mapped back to a
global position through the generations; only the old streams a new rank's slice overlaps are
replayed (their shuffle order recomputed), so every remaining sample is read exactly once and
every rank still gets the same number of batches.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.data.index import ShardIndex, ShardTable


@dataclass(frozen=True)
class PlanConfig:
    world_size: int
    rank: int
    num_streams: int
    batch_size: int
    seed: int
    shuffle: bool
    drop_last: bool
    samples_per_epoch: int | None
    shuffle_buffer: int = 1000
    lanes: int = 1               # shards a stream reads at once, interleaved (shuffled epochs only)


@dataclass(frozen=True)
class Generation:
    """One plan an epoch ran under, and how far each of its streams got (batches handed out,
    the same on every rank)."""
    world_size: int
    num_streams: int
    batch_size: int
    drop_last: bool
    shuffle_buffer: int
    consumed: tuple[int, ...]
    lanes: int = 1               # states written before lanes existed read their shards one by one


@dataclass(frozen=True)
class StreamPlan:
    """What one stream reads in one epoch: its batches and, per local position, the row of its
    shard in ``shards`` and the sample's index in that shard (ascending within a shard)."""
    batch_sizes: tuple[int, ...]
    batch_indices: tuple[int, ...]
    shards: ShardTable
    position_shard: np.ndarray     # int32 [n]: row in ``shards``
    position_offset: np.ndarray    # int32 [n]: sample index within the shard
    finite: bool                   # False: resampled (drawn beyond what the batches need)

    @property
    def num_positions(self) -> int:
        return len(self.position_shard)


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


def _split_sizes(num_samples: int, num_batches: int, batch_size: int) -> np.ndarray:
    """``num_batches`` sizes in 1..batch_size summing to ``num_samples``, full ones first: the
    deficit is taken from the last batches, ``batch_size - 1`` from each until it is paid."""
    sizes = np.full(num_batches, batch_size, dtype=np.int64)
    deficit = num_batches * batch_size - num_samples
    if deficit > 0:
        whole, part = divmod(deficit, batch_size - 1) if batch_size > 1 else (0, 0)
        if whole:
            sizes[num_batches - whole:] = 1
        if part:
            sizes[num_batches - whole - 1] -= part
    return sizes


def rank_batch_sizes(num_samples: int, cfg: PlanConfig) -> tuple[int, int, np.ndarray]:
    """(first sample of the rank in the sequence, samples of the rank, its batch sizes)."""
    W, B, r = cfg.world_size, cfg.batch_size, cfg.rank
    if cfg.samples_per_epoch is not None:
        batches = max(1, cfg.samples_per_epoch // (W * B))
        return 0, batches * B, np.full(batches, B, dtype=np.int64)
    if cfg.drop_last:
        batches = num_samples // (W * B)
        if batches == 0:
            raise ValueError(f"{num_samples} samples make no full batch of {B} on each of {W} ranks "
                             f"(drop_last=True); use a smaller batch or drop_last=False")
        return r * batches * B, batches * B, np.full(batches, B, dtype=np.int64)
    q, rem = divmod(num_samples, W)
    batches = math.ceil((q + (rem > 0)) / B)
    if q < batches:
        raise ValueError(f"{num_samples} samples cannot give each of {W} ranks the same number of "
                         f"non-empty batches of at most {B}; use fewer ranks or drop_last=True")
    mine = q + (r < rem)
    return r * q + min(r, rem), mine, _split_sizes(mine, batches, B)


def _stream_slices(num_samples: int, cfg: PlanConfig) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per stream of the rank: (first position in the sequence, its batch sizes, their indices
    in the rank's epoch)."""
    rank_start, _, sizes = rank_batch_sizes(num_samples, cfg)
    K = cfg.num_streams
    per_stream = np.bincount(np.arange(len(sizes)) % K, weights=sizes, minlength=K).astype(np.int64)
    starts = rank_start + np.concatenate([[0], np.cumsum(per_stream)[:-1]])
    return [(int(starts[k]), sizes[k::K], np.arange(k, len(sizes), K)) for k in range(K)]


def shuffled_positions(total: int | None, buffer_size: int, rng: np.random.Generator | None) -> Iterator[int]:
    """The order a stream yields its positions 0..total-1 (infinite when ``total`` is None):
    a shuffle buffer of ``buffer_size`` run on positions, so it needs no data to be computed."""
    positions: Iterable[int] = itertools.count() if total is None else range(total)
    if rng is None or buffer_size <= 1:
        yield from positions
        return
    buf: list[int] = []
    for p in positions:
        buf.append(p)
        if len(buf) >= buffer_size:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    yield from (buf[i] for i in rng.permutation(len(buf)))


def lane_cuts(shard_runs: np.ndarray, lanes: int) -> np.ndarray:
    """Where a stream's lanes start (and, last, its length): the shard boundaries nearest to
    multiples of n / lanes."""
    n = len(shard_runs)
    if lanes <= 1 or n == 0:
        return np.array([0, n], dtype=np.int64)
    starts = np.flatnonzero(np.diff(shard_runs, prepend=shard_runs[0] - 1))   # first position of each shard
    targets = np.arange(1, lanes) * (n / lanes)
    right = np.minimum(np.searchsorted(starts, targets), len(starts) - 1)
    left = np.maximum(right - 1, 0)
    nearest = np.where(np.abs(starts[left] - targets) <= np.abs(starts[right] - targets), starts[left], starts[right])
    return np.unique(np.concatenate([[0], nearest, [n]])).astype(np.int64)


def lane_order(shard_runs: np.ndarray, lanes: int) -> np.ndarray:
    """The order a stream reads its positions 0..n-1 in when it reads ``lanes`` shards at once:
    its positions (ascending; ``shard_runs[i]`` equal for consecutive positions of one shard) cut
    at shard boundaries into ``lanes`` lanes of about n / lanes positions (fewer when the stream
    has fewer shards), each lane read in order, the lanes interleaved in proportion to their
    lengths (position j of a lane of length m comes at (j + 1/2) / m), so that they end together.
    A pure function of the shard boundaries: the elastic replay recomputes it. Identity for 1."""
    n = len(shard_runs)
    if lanes <= 1 or n == 0:
        return np.arange(n, dtype=np.int64)
    cuts = lane_cuts(shard_runs, lanes)
    length = np.diff(cuts)
    lane = np.repeat(np.arange(len(length)), length)
    step = np.arange(n) - np.repeat(cuts[:-1], length)
    return np.lexsort((lane, (step + 0.5) / length[lane])).astype(np.int64)


def read_order(shard_runs: np.ndarray, cfg: PlanConfig, rng: np.random.Generator | None) -> Iterator[int]:
    """The order a stream yields its positions: the shuffle buffer (``shuffled_positions``) run over
    the lanes' interleaved order (``lane_order``; one lane when the epoch is not shuffled)."""
    interleaved = lane_order(shard_runs, cfg.lanes if rng is not None else 1)
    for i in shuffled_positions(len(interleaved), cfg.shuffle_buffer, rng):
        yield int(interleaved[i])


def shuffle_rng(cfg: PlanConfig, epoch: int, stream: int, generation: int) -> np.random.Generator | None:
    if not cfg.shuffle:
        return None
    extra = (generation,) if generation else ()
    return _rng(cfg.seed, epoch, cfg.rank, stream, 1, *extra)


def batch_seed(cfg: PlanConfig, epoch: int, batch_index: int, generation: int) -> int:
    extra = (generation,) if generation else ()
    return int(_rng(cfg.seed, epoch, cfg.rank, batch_index, 3, *extra).integers(2**62))


def batch_transform_seed(cfg: PlanConfig, epoch: int, batch_index: int, generation: int) -> int:
    """Seed of the per-batch transform (``Batch.seed``), a stream apart from the crops' seed."""
    extra = (generation,) if generation else ()
    return int(_rng(cfg.seed, epoch, cfg.rank, batch_index, 4, *extra).integers(2**62))


class EpochSequence:
    """The positions an epoch still has to read, generation by generation (module docstring).

    ``length(g)`` is the size of R(g); ``positions(g, idx)`` maps indices into R(g) (ascending) to
    global positions in the epoch's shard-permuted sequence (ascending too)."""

    def __init__(self, num_samples: int, generations: Sequence[Generation], cfg: PlanConfig,
                 epoch: int, cumulative: np.ndarray | None = None) -> None:
        self.num_samples = num_samples
        self.cumulative = cumulative        # shard boundaries in the sequence (for lanes > 1)
        self._replayed: dict[tuple[int, int], np.ndarray] = {}
        self.generations = list(generations)
        self.cfg = cfg
        self.epoch = epoch
        self._lengths = [num_samples]
        self._blocks: list[tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]] = []
        for g, gen in enumerate(self.generations):
            starts, remaining, streams = self._remaining_blocks(g, gen)
            self._blocks.append((starts, np.concatenate([[0], np.cumsum(remaining)]), streams))
            self._lengths.append(int(np.sum(remaining)))

    def length(self, g: int) -> int:
        return self._lengths[g]

    def _gen_cfg(self, gen: Generation, rank: int) -> PlanConfig:
        return replace(self.cfg, world_size=gen.world_size, rank=rank, num_streams=gen.num_streams,
                       batch_size=gen.batch_size, drop_last=gen.drop_last,
                       shuffle_buffer=gen.shuffle_buffer, lanes=gen.lanes)

    def _remaining_blocks(self, g: int, gen: Generation) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
        """R(g) cut into blocks (one per stream of generation g, then the part no rank read):
        their first index in R(g), how many of their positions remain, and (rank, stream, length)."""
        n = self._lengths[g]
        starts, remaining, streams = [], [], []
        covered = 0
        for rank in range(gen.world_size):
            for k, (start, sizes, _) in enumerate(_stream_slices(n, self._gen_cfg(gen, rank))):
                length = int(sizes.sum())
                starts.append(start)
                remaining.append(length - int(sizes[:gen.consumed[k]].sum()))
                streams.append((rank, k, length))
                covered = max(covered, start + length)
        starts.append(covered)                 # drop_last leaves the tail unread: it remains
        remaining.append(n - covered)
        streams.append((-1, -1, n - covered))
        return np.asarray(starts, dtype=np.int64), np.asarray(remaining, dtype=np.int64), streams

    def _remaining_locals(self, g: int, block: int) -> np.ndarray:
        """Ascending local positions of a generation-g block that it did not consume."""
        if (g, block) not in self._replayed:
            self._replayed[(g, block)] = self._replay(g, block)
        return self._replayed[(g, block)]

    def _replay(self, g: int, block: int) -> np.ndarray:
        gen = self.generations[g]
        rank, k, length = self._blocks[g][2][block]
        if rank < 0:
            return np.arange(length, dtype=np.int64)
        cfg = self._gen_cfg(gen, rank)
        start, sizes, _ = _stream_slices(self._lengths[g], cfg)[k]
        taken = int(sizes[:gen.consumed[k]].sum())
        rng = shuffle_rng(cfg, self.epoch, k, g)
        if gen.lanes > 1 and rng is not None:
            if self.cumulative is None:
                raise ValueError("replaying a generation that read several shards at once needs the shard counts")
            runs = np.searchsorted(self.cumulative, self.positions(g, np.arange(start, start + length)), side="right")
            order: Iterator[int] = read_order(runs, cfg, rng)
        else:
            order = shuffled_positions(length, gen.shuffle_buffer, rng)
        keep = np.ones(length, dtype=bool)
        keep[np.fromiter(itertools.islice(order, taken), dtype=np.int64, count=taken)] = False
        return np.flatnonzero(keep)

    def positions(self, g: int, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        while g > 0:
            starts, cumulative, _ = self._blocks[g - 1]
            block_of = np.searchsorted(cumulative, idx, side="right") - 1
            out = np.empty_like(idx)
            for block in np.unique(block_of):
                mask = block_of == block
                locals_ = self._remaining_locals(g - 1, int(block))
                out[mask] = starts[block] + locals_[idx[mask] - cumulative[block]]
            idx, g = out, g - 1
        return idx


def _positions_to_plan(positions: np.ndarray, order: np.ndarray, cumulative: np.ndarray,
                       shards: ShardTable, sizes: np.ndarray, indices: np.ndarray) -> StreamPlan:
    """A stream plan from ascending global positions of the shard-permuted sequence."""
    ordered = np.searchsorted(cumulative, positions, side="right") - 1
    offsets = positions - cumulative[ordered]
    run_starts = np.flatnonzero(np.diff(ordered, prepend=-1)) if len(ordered) else np.zeros(0, np.int64)
    rows = order[ordered[run_starts]]
    position_shard = np.cumsum(np.diff(ordered, prepend=-1) != 0) - 1 if len(ordered) else ordered
    return StreamPlan(tuple(sizes.tolist()), tuple(indices.tolist()), shards.take(rows),
                      position_shard.astype(np.int32), offsets.astype(np.int32), True)


def plan_epoch(index: ShardIndex, epoch: int, cfg: PlanConfig,
               generations: Sequence[Generation] = ()) -> list[StreamPlan]:
    """The plans of the rank's ``cfg.num_streams`` streams for ``epoch`` (vectorised: one
    permutation and one cumulative sum of the shard counts, then a search per stream)."""
    counts = index.shards.num_samples
    K = cfg.num_streams
    if cfg.samples_per_epoch is not None:
        return [_resampled_plan(index.shards, epoch, k, cfg) for k in range(K)]
    order = _rng(cfg.seed, epoch, 0).permutation(len(counts)) if cfg.shuffle else np.arange(len(counts))
    cumulative = np.concatenate([[0], np.cumsum(counts[order])])
    sequence = EpochSequence(int(cumulative[-1]), generations, cfg, epoch, cumulative)
    g = len(generations)
    n = sequence.length(g)
    plans = []
    for start, sizes, indices in _stream_slices(n, cfg):
        positions = sequence.positions(g, np.arange(start, start + int(sizes.sum()), dtype=np.int64))
        plans.append(_positions_to_plan(positions, order, cumulative, index.shards, sizes, indices))
    return plans


def _resampled_plan(shards: ShardTable, epoch: int, stream: int, cfg: PlanConfig) -> StreamPlan:
    _, sizes, mine = _stream_slices(0, cfg)[stream]
    needed = int(sizes.sum())
    counts = shards.num_samples
    cdf = np.cumsum(counts, dtype=np.float64)
    cdf /= cdf[-1]
    rng = _rng(cfg.seed, epoch, cfg.rank, stream, 2)
    drawn: list[np.ndarray] = []
    total = 0
    while total < needed:     # the draws of rng.choice(len, 256, p=counts/sum), with the cdf kept
        chunk = np.searchsorted(cdf, rng.random(256), side="right")
        drawn.append(chunk)
        total += int(counts[chunk].sum())
    rows = np.concatenate(drawn)
    rows = rows[:int(np.searchsorted(np.cumsum(counts[rows]), needed)) + 1]
    row_counts = counts[rows]
    position_shard = np.repeat(np.arange(len(rows), dtype=np.int32), row_counts)
    starts = np.repeat(np.cumsum(row_counts) - row_counts, row_counts)
    offsets = (np.arange(len(position_shard)) - starts).astype(np.int32)
    return StreamPlan(tuple(sizes.tolist()), tuple(mine.tolist()), shards.take(rows), position_shard,
                      offsets, False)
