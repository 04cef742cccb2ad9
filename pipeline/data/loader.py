"""Streaming reader: exact (rank, worker) split, equal batch counts, elastic resumable position.

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

Output: ``output="float"`` (default) yields normalised float images with their targets, made in
the workers; ``output="uint8"`` yields the cropped uint8 images (4x fewer bytes to hand over and
pin) with ``targets=None`` and the batch's ``seed``: ``DeviceBatchTransform`` then normalises,
smooths, mixes (and, with ``augment.randaug_device``, runs RandAugment) on the training device,
giving the same batch as the float path would (the same seed drives both).

Elastic resume (another world size or worker count mid-epoch; docs/DESIGN.md has the proof
sketch): the state lists the epoch's GENERATIONS, one per plan the epoch ran under, each with its
world size, streams, shuffle buffer and per-stream consumed counts. Generation 0 plans over the
epoch's full sequence R0; generation g+1 plans, exactly as above, over R(g+1) = R(g) minus the
positions generation g consumed, in R(g)'s order. A position of R(g+1) is mapped back to a
global position through the generations; only the old streams a new rank's slice overlaps are
replayed (their shuffle order recomputed), so every remaining sample is read exactly once and
every rank still gets the same number of batches.

Bad data: every per-sample failure (decode, conversion to 8-bit RGB, label, transform, shape) is
skipped and counted (shard, key, reason); so are truncated or corrupt tars and unopenable shards,
after object-storage errors were retried with backoff for ``RetryPolicy.timeout_s``. A shard with
a sha256 in the index is downloaded and verified before any of its samples is used; a mismatch
skips the whole shard (counted, reported). The one exception is a file SHORTER than the index
says (a truncated copy): its complete leading samples are used and the rest counted as
truncated. A tar that stops early although the file has its full size has a corrupt header, and
is reported as such. When an epoch's skipped samples exceed
``max_skip_fraction`` of the rank's planned samples the loader raises ``DataError`` naming them.
Skipped samples count as consumed, so a resume never meets them again. A batch whose samples
were all skipped is still yielded, EMPTY (``len(batch) == 0``): every rank must run the same
number of steps, so the trainer runs it as a step that contributes nothing.
"""
from __future__ import annotations

import itertools
import math
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.cropdecode import CropDecoder
from pipeline.data.index import ShardIndex, ShardTable
from pipeline.data.reader import (DEFAULT_MAX_PIXELS, BadSample, ChecksumMismatch, CountingReader,
                                  decode_sample, fetch_verified, parse_labels, tar_samples)
from pipeline.data.storage import DataError, open_file, register_webdataset_handlers, resolve_url
from pipeline.data.transforms import AugmentConfig, DeviceBatchTransform, crop_transform
from pipeline.redact import redact
from pipeline.retry import RetryPolicy, is_transient

STATE_VERSION = 2
_MAX_SKIP_RECORDS = 1000


# ---------------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkippedSample:
    shard: str      # shard URL as written in the index (relative; never carries credentials)
    key: str        # sample key, or "#<index in shard>" when the tar ended before it
    reason: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {self.reason}"


@dataclass
class Batch:
    images: torch.Tensor            # float [B, 3, H, W] normalised | uint8 (output="uint8")
    labels: torch.Tensor            # long [B] (single-label) | float [B, C] multi-hot
    targets: torch.Tensor | None    # float [B, C]: smoothed, mixed (train); one/multi-hot (eval);
                                    # None for output="uint8" (DeviceBatchTransform makes them)
    keys: list[str]
    epoch: int
    index: int                      # position of this batch in the rank's epoch (generation)
    stream: int                     # which reader (DataLoader worker) made it
    skipped: list[SkippedSample] = field(default_factory=list)   # since the stream's last batch
    retries: int = 0                # storage retries since the stream's last batch
    seed: int = 0                   # seeds the per-batch randomness (DeviceBatchTransform)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        targets = None if self.targets is None else self.targets.to(device, non_blocking=non_blocking)
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking), targets=targets)

    def pin_memory(self) -> Batch:   # called by DataLoader(pin_memory=True)
        targets = None if self.targets is None else self.targets.pin_memory()
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(),
                       targets=targets)


@dataclass
class LoaderStats:
    samples: int = 0                # samples yielded to the trainer (this process, all epochs)
    batches: int = 0
    skipped: int = 0
    retries: int = 0
    skipped_samples: list[SkippedSample] = field(default_factory=list)   # the first 1000


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


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

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


def _shuffle_rng(cfg: PlanConfig, epoch: int, stream: int, generation: int) -> np.random.Generator | None:
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
                 epoch: int) -> None:
        self.num_samples = num_samples
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
                       shuffle_buffer=gen.shuffle_buffer)

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
        gen = self.generations[g]
        rank, k, length = self._blocks[g][2][block]
        if rank < 0:
            return np.arange(length, dtype=np.int64)
        cfg = self._gen_cfg(gen, rank)
        sizes = _stream_slices(self._lengths[g], cfg)[k][1]
        taken = int(sizes[:gen.consumed[k]].sum())
        order = shuffled_positions(length, gen.shuffle_buffer, _shuffle_rng(cfg, self.epoch, k, g))
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
    sequence = EpochSequence(int(cumulative[-1]), generations, cfg, epoch)
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


# ---------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------

@dataclass
class _Raw:
    shard: str
    key: str
    files: dict[str, bytes]


class _StreamReader:
    """Reads a stream's shards in order; yields (position, _Raw | SkippedSample) for every
    position not in ``consumed``; consumed positions are never decoded and shards with no wanted
    position never opened."""

    def __init__(self, root: str, plan: StreamPlan, consumed: set[int], retry: RetryPolicy,
                 verify_checksums: bool, storage_options: dict[str, Any] | None) -> None:
        self.root = root
        self.plan = plan
        self.consumed = consumed
        self.retry = retry
        self.verify_checksums = verify_checksums
        self.storage_options = storage_options
        self.retries = 0

    def __iter__(self) -> Iterator[tuple[int, _Raw | SkippedSample]]:
        plan = self.plan
        bounds = np.flatnonzero(np.diff(plan.position_shard, prepend=-1, append=-2))
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            wanted = {int(plan.position_offset[p]): p for p in range(a, b) if p not in self.consumed}
            self.consumed.difference_update(range(a, b))
            if wanted:
                yield from self._read_shard(int(plan.position_shard[a]), wanted)

    def _open(self, url: str, sha256: str | None, expected_size: int) -> IO[bytes]:
        f = open_file(url, "rb", self.storage_options)
        if sha256 is None or not self.verify_checksums:
            return f
        with f:
            return fetch_verified(f, sha256, expected_size)

    def _read_shard(self, row: int, wanted: dict[int, int]) -> Iterator[tuple[int, _Raw | SkippedSample]]:
        shards = self.plan.shards
        name = shards.url(row)
        url = resolve_url(self.root, name)
        sha256 = shards.sha256_hex(row)
        expected_size = int(shards.size_bytes[row])
        todo = sorted(wanted)                 # in-shard indices still to yield
        delays = self.retry.delays()
        while todo:
            reason = None
            try:
                with self._open(url, sha256, expected_size) as f:
                    reader = CountingReader(f)
                    seen = 0
                    for i, (key, files) in enumerate(tar_samples(reader, redact(url))):
                        seen = i + 1
                        if i == todo[0]:
                            todo.pop(0)
                            yield wanted[i], _Raw(name, key, files)
                            if not todo:
                                break
                    if todo:
                        size = reader.drain()
                        if 0 <= expected_size == size:
                            reason = f"corrupt tar header after sample {seen} (the file has its full size)"
                        else:
                            reason = (f"shard ended after {seen} of {int(shards.num_samples[row])} "
                                      f"samples (truncated: {size} of {expected_size} bytes)")
            except ChecksumMismatch as exc:
                reason = (f"checksum mismatch for shard {redact(url)}: sha256 {exc.actual} but the "
                          f"index says {exc.expected}; the shard is skipped whole")
            except (tarfile.TarError, EOFError) as exc:
                reason = f"truncated or corrupt tar ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            except ValueError as exc:        # webdataset: a duplicate entry in one sample
                reason = f"corrupt tar ({exc})"
            except Exception as exc:
                delay = next(delays, None) if is_transient(exc) else None
                if delay is not None:
                    self.retries += 1
                    time.sleep(delay)
                    continue
                reason = f"shard failed to open or read ({type(exc).__name__}: {exc})"
            if reason is not None:
                for i in todo:
                    yield wanted[i], SkippedSample(name, f"#{i}", reason)
                todo = []


# ---------------------------------------------------------------------------------------------
# Decoding and batching (runs in DataLoader workers)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _StreamJob:
    """Everything a worker needs, and no more: its stream's plan, not the index."""
    root: str
    label_type: str
    num_classes: int
    plan: PlanConfig
    epoch: int
    generation: int
    streams: tuple[StreamPlan, ...]
    consumed: tuple[int, ...]
    img_size: int
    train: bool
    augment: AugmentConfig
    retry: RetryPolicy
    verify_checksums: bool
    storage_options: dict[str, Any] | None
    max_pixels: int
    output: Literal["float", "uint8"] = "float"
    crop_decode: bool = False


def _sample_tensor(item: _Raw, job: _StreamJob, transform: Any,
                   crop_decoder: CropDecoder | None = None) -> tuple[torch.Tensor, int | list[int]]:
    """One sample through decode, conversion and the per-sample transform (a JPEG through
    ``crop_decoder`` when given: decode and crop in one); BadSample if any step fails or the
    result is not a [3, img_size, img_size] uint8 image."""
    jpeg = next((item.files[e] for e in ("jpg", "jpeg") if e in item.files), None)
    out: torch.Tensor | None = None
    if crop_decoder is not None and jpeg is not None:
        label = parse_labels(item.files, job.label_type, job.num_classes)
        try:
            out = crop_decoder(jpeg)
        except BadSample:
            raise
        except Exception as exc:
            raise BadSample(f"transform failed ({type(exc).__name__}: {exc})") from exc
    if out is None:
        image, label = decode_sample(item.files, job.label_type, job.num_classes, job.max_pixels)
        try:
            out = transform(image)
        except Exception as exc:
            raise BadSample(f"transform failed ({type(exc).__name__}: {exc})") from exc
    if out.shape != (3, job.img_size, job.img_size) or out.dtype != torch.uint8:
        raise BadSample(f"transform gave {tuple(out.shape)} {out.dtype}, expected "
                        f"(3, {job.img_size}, {job.img_size}) uint8")
    return out, label


def _stack(images: list[torch.Tensor], img_size: int) -> torch.Tensor:
    """uint8 [B, 3, img_size, img_size]; in a DataLoader worker, stacked straight into shared
    memory (as torch's default collate does), so handing it over copies nothing more."""
    shape = (len(images), 3, img_size, img_size)
    if get_worker_info() is None or not images:
        return torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.stack(images, out=torch.empty(0, dtype=torch.uint8).set_(storage).view(shape))


def stream_batches(job: _StreamJob, stream: int) -> Iterator[Batch]:
    """The batches of one stream of one rank for one epoch, after ``job.consumed[stream]``."""
    cfg = job.plan
    plan = job.streams[stream]
    shuffle_rng = _shuffle_rng(cfg, job.epoch, stream, job.generation)
    positions = shuffled_positions(plan.num_positions, cfg.shuffle_buffer, shuffle_rng)
    done = job.consumed[stream]
    consumed = set(itertools.islice(positions, sum(plan.batch_sizes[:done])))
    reader = _StreamReader(job.root, plan, consumed, job.retry, job.verify_checksums,
                           job.storage_options)
    items = iter(reader)
    read_ahead: dict[int, _Raw | SkippedSample] = {}
    transform = crop_transform(job.augment, job.img_size, job.train)
    crop_decoder = (CropDecoder(job.augment, job.img_size, job.max_pixels)
                    if job.train and job.crop_decode else None)
    per_batch = DeviceBatchTransform(job.augment, job.num_classes, job.label_type,  # type: ignore[arg-type]
                                     train=job.train)
    retries_reported = 0

    for size, batch_index in zip(plan.batch_sizes[done:], plan.batch_indices[done:]):
        images, labels, keys, skipped = [], [], [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(cfg, job.epoch, batch_index, job.generation))
            for p in itertools.islice(positions, size):
                while p not in read_ahead:
                    position, item = next(items)
                    read_ahead[position] = item
                item = read_ahead.pop(p)
                if isinstance(item, SkippedSample):
                    skipped.append(item)
                    continue
                try:
                    image, label = _sample_tensor(item, job, transform, crop_decoder)
                except BadSample as exc:
                    skipped.append(SkippedSample(item.shard, item.key, str(exc)))
                    continue
                images.append(image)
                labels.append(label)
                keys.append(item.key)
            if job.label_type == "single":
                label_tensor = torch.tensor(labels, dtype=torch.long)
            else:
                label_tensor = torch.zeros(len(labels), job.num_classes)
                for row, sample_labels in enumerate(labels):
                    label_tensor[row, sample_labels] = 1.0
            image_tensor = _stack(images, job.img_size)
        seed = batch_transform_seed(cfg, job.epoch, batch_index, job.generation)
        targets: torch.Tensor | None = None
        if job.output == "float":
            image_tensor, targets = per_batch.apply(image_tensor, label_tensor, seed)
        yield Batch(image_tensor, label_tensor, targets, keys, job.epoch, batch_index, stream,
                    skipped, reader.retries - retries_reported, seed)
        retries_reported = reader.retries
    if plan.finite:
        for position, _ in items:
            raise RuntimeError(f"stream {stream} read position {position} that no batch asked for")


class _EpochDataset(IterableDataset):
    def __init__(self, job: _StreamJob) -> None:
        self.job = job

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        return stream_batches(self.job, worker.id if worker is not None else 0)


def _worker_init(_: int) -> None:
    register_webdataset_handlers()


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

class StreamingLoader:
    """Batches of one rank, read from WebDataset shards through fsspec (see the module docstring).

    ``len(loader)`` is the number of batches of a whole epoch, identical on every rank.
    Iterating yields the epoch's remaining batches; after a complete pass the loader moves to
    the next epoch. ``set_epoch(e)`` starts epoch ``e`` from its beginning, unless ``e`` is the
    current epoch (so a restored mid-epoch position survives the usual ``set_epoch`` call of a
    training loop). ``state_dict()`` is identical on every rank; restoring it continues the epoch
    where it stopped, at the same or another world size and worker count: no consumed batch
    again, no sample left out (batches prefetched but not yet handed out are produced again).
    """

    def __init__(self, index: ShardIndex | str, *, rank: int = 0, world_size: int = 1,
                 batch_size: int, img_size: int = 224, train: bool = True, seed: int = 0,
                 num_workers: int = 2, augment: AugmentConfig | None = None,
                 samples_per_epoch: int | None = None, max_skip_fraction: float = 0.001,
                 shuffle: bool | None = None, shuffle_buffer: int = 1000, drop_last: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2, verify_checksums: bool = True,
                 retry: RetryPolicy | None = None, storage_options: dict[str, Any] | None = None,
                 multiprocessing_context: str | None = None,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 output: Literal["float", "uint8"] = "float", crop_decode: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or num_workers < 0 or img_size < 8:
            raise ValueError("batch_size must be >= 1, num_workers >= 0 and img_size >= 8")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index, storage_options)
        if self.index.num_samples == 0:
            raise DataError(f"shard index under {redact(self.index.root)} has no samples")
        self.train = train
        self.img_size = img_size
        self.num_workers = num_workers
        self.augment = augment or AugmentConfig()
        self.max_skip_fraction = max_skip_fraction
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.verify_checksums = verify_checksums
        self.retry = retry or RetryPolicy()
        self.storage_options = storage_options
        self.multiprocessing_context = multiprocessing_context
        self.max_image_pixels = max_image_pixels
        self.output = output
        self.crop_decode = crop_decode
        self.plan = PlanConfig(world_size=world_size, rank=rank, num_streams=max(1, num_workers),
                               batch_size=batch_size, seed=seed,
                               shuffle=train if shuffle is None else shuffle,
                               drop_last=drop_last, samples_per_epoch=samples_per_epoch,
                               shuffle_buffer=shuffle_buffer)
        _, self._rank_samples, sizes = rank_batch_sizes(self.index.num_samples, self.plan)
        self._num_batches = len(sizes)
        register_webdataset_handlers()   # for webdataset users in this process; workers do it too
        self.stats = LoaderStats()
        self._epoch = 0
        self._generations: list[Generation] = []
        self._consumed = [0] * self.plan.num_streams
        self._generation_batches = self._num_batches
        self._skipped_in_epoch = 0

    def batch_transform(self) -> DeviceBatchTransform:
        """What turns this loader's batches into (float images, targets) on a device:
        ``images, targets = loader.batch_transform()(batch, device)`` (a float batch passes)."""
        return DeviceBatchTransform(self.augment, self.index.num_classes,
                                    self.index.label_type, train=self.train)  # type: ignore[arg-type]

    # -- position ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_remaining(self) -> int:
        return self._generation_batches - sum(self._consumed)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._generations = []
            self._consumed = [0] * self.plan.num_streams
            self._generation_batches = self._num_batches
            self._skipped_in_epoch = 0

    def _generation(self) -> Generation:
        p = self.plan
        return Generation(p.world_size, p.num_streams, p.batch_size, p.drop_last, p.shuffle_buffer,
                          tuple(self._consumed))

    def state_dict(self) -> dict[str, Any]:
        p = self.plan
        generations = self._generations + [self._generation()]
        return {"version": STATE_VERSION, "epoch": self._epoch, "consumed": list(self._consumed),
                "batches_consumed": sum(sum(g.consumed) for g in generations),
                "skipped_in_epoch": self._skipped_in_epoch,
                "index": self.index.fingerprint(), "seed": p.seed, "world_size": p.world_size,
                "batch_size": p.batch_size, "num_streams": p.num_streams, "shuffle": p.shuffle,
                "drop_last": p.drop_last, "samples_per_epoch": p.samples_per_epoch,
                "shuffle_buffer": p.shuffle_buffer,
                "generations": [{**asdict(g), "consumed": list(g.consumed)} for g in generations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the same epoch, at this loader's world size and workers.

        Mid-epoch, the seed, batch size, shuffle, drop_last and samples_per_epoch must match (and,
        for a resampled epoch, the world size and workers too); otherwise ValueError."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["index"] != self.index.fingerprint() and state["index"] != self.index.legacy_fingerprint():
            raise ValueError("loader state was saved on a different shard index (dataset changed)")
        p = self.plan
        mine = self.state_dict()
        saved = [Generation(g["world_size"], g["num_streams"], g["batch_size"], g["drop_last"],
                            g["shuffle_buffer"], tuple(int(c) for c in g["consumed"]))
                 for g in state.get("generations", [])]
        if not saved:      # version 1: one generation, with this loader's shuffle buffer
            saved = [Generation(state["world_size"], state["num_streams"], state["batch_size"],
                                state["drop_last"], p.shuffle_buffer,
                                tuple(int(c) for c in state["consumed"]))]
        started = any(any(g.consumed) for g in saved)
        if started:
            fields = ["seed", "batch_size", "shuffle", "drop_last", "samples_per_epoch"]
            if p.samples_per_epoch is not None:
                fields += ["world_size", "num_streams"]
            changed = {f: (state[f], mine[f]) for f in fields if state[f] != mine[f]}
            if changed:
                raise ValueError(f"cannot resume mid-epoch with a different plan {changed} "
                                 f"(saved, now); resume with the same settings or at an epoch start")
        self._epoch = int(state["epoch"])
        self._skipped_in_epoch = int(state.get("skipped_in_epoch", 0))
        last = saved[-1]
        if not started:
            self._generations = []
            self._consumed = [0] * p.num_streams
        elif (last.world_size, last.num_streams, last.shuffle_buffer) == \
                (p.world_size, p.num_streams, p.shuffle_buffer):
            self._generations = saved[:-1]
            self._consumed = list(last.consumed)
        else:
            self._generations = saved
            self._consumed = [0] * p.num_streams
        self._generation_batches = self._batches_in_generation()

    def _batches_in_generation(self) -> int:
        if not self._generations:
            return self._num_batches
        sequence = EpochSequence(self.index.num_samples, self._generations, self.plan, self._epoch)
        return len(rank_batch_sizes(sequence.length(len(self._generations)), self.plan)[2])

    # -- iteration -----------------------------------------------------------------------------

    def _job(self) -> _StreamJob:
        streams = plan_epoch(self.index, self._epoch, self.plan, self._generations)
        return _StreamJob(self.index.root, self.index.label_type, self.index.num_classes, self.plan,
                          self._epoch, len(self._generations), tuple(streams), tuple(self._consumed),
                          self.img_size, self.train, self.augment, self.retry,
                          self.verify_checksums, self.storage_options, self.max_image_pixels,
                          self.output, self.crop_decode)

    def _record(self, batch: Batch) -> None:
        self._consumed[batch.stream] += 1
        self.stats.batches += 1
        self.stats.samples += len(batch)
        self.stats.retries += batch.retries
        if batch.skipped:
            self.stats.skipped += len(batch.skipped)
            self._skipped_in_epoch += len(batch.skipped)
            room = _MAX_SKIP_RECORDS - len(self.stats.skipped_samples)
            self.stats.skipped_samples.extend(batch.skipped[:max(0, room)])
            if self._skipped_in_epoch > self.max_skip_fraction * self._rank_samples:
                listed = "\n  ".join(str(s) for s in self.stats.skipped_samples[:20])
                raise DataError(
                    f"{self._skipped_in_epoch} of {self._rank_samples} samples of rank "
                    f"{self.plan.rank} skipped in epoch {self._epoch}, over the allowed "
                    f"{self.max_skip_fraction:.3%}:\n  {listed}")

    def __iter__(self) -> Iterator[Batch]:
        if self.batches_remaining == 0:
            self.set_epoch(self._epoch + 1)
        dataset = _EpochDataset(self._job())
        if self.num_workers == 0:
            batches: Iterable[Batch] = iter(dataset)
        else:
            batches = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                 pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                                 worker_init_fn=_worker_init, persistent_workers=False,
                                 multiprocessing_context=self.multiprocessing_context)
        for batch in batches:
            self._record(batch)
            yield batch
        if self.batches_remaining != 0:
            raise DataError(f"internal error: rank {self.plan.rank} yielded "
                            f"{self._generation_batches - self.batches_remaining} of "
                            f"{self._generation_batches} batches in epoch {self._epoch}")
        self.set_epoch(self._epoch + 1)
