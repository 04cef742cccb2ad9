"""Streaming reader: exact (rank, worker) split, equal batch counts, resumable position.

Planning (the same pure function on every rank and worker, from the index's per-shard counts):

- finite epoch: the shards are permuted with ``(seed, epoch)``; their samples, concatenated, form
  one sequence of N samples. Rank r takes a contiguous slice of ``N // W`` or ``N // W + 1``
  samples and splits it into ``L = ceil(ceil(N / W) / B)`` batches on EVERY rank: full batches
  first, the deficit taken from the last batches (so a rank's last batches may be short by a few
  samples; none is empty). Every sample is read exactly once and every rank yields exactly L
  batches - neither padding nor dropping. (``drop_last=True`` instead yields only full batches,
  ``N // (W * B)`` per rank, leaving the epoch's tail unread.)
- a rank's batch j belongs to its stream ``j % K`` (K = DataLoader workers, or 1 without
  workers), matching the DataLoader's round-robin; stream k reads a contiguous slice of the rank's
  samples, so each shard is streamed sequentially by one reader (two at slice boundaries).
- resampled mode (``samples_per_epoch``): each stream draws whole shards with replacement
  (probability proportional to their sample count) from ``(seed, epoch, rank, stream)``; every
  rank yields ``samples_per_epoch // (W * B)`` full batches.

Within a stream, the read order is shuffled with a shuffle buffer that runs on sample POSITIONS
(known from the index) rather than on data: the order a stream yields is a pure function of the
plan, so a restored state ``consumed[k]`` (batches of stream k handed to the trainer) tells
exactly which positions were consumed. On resume they are not decoded again: shards whose samples
were all consumed are not opened, and the one partly consumed shard per stream is streamed past
without decoding. Augmentation randomness is seeded per batch, so a resumed epoch yields the same
batches an uninterrupted one would have (the batch order across workers may differ).

Bad data: a corrupt image, missing / out-of-range label, truncated tar or unopenable shard is
skipped and counted (shard, key, reason); object-storage errors are retried with backoff first.
When an epoch's skipped samples exceed ``max_skip_fraction`` of the rank's planned samples the
loader raises ``DataError`` naming them. The reader that starts a shard hashes all of it (reading
the tail raw when the shard is split between readers); a sha256 different from the index's is a
``DataError`` at once. Not verified: shards whose head was consumed before a resume.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from pipeline.data.index import ShardIndex
from pipeline.data.storage import (DataError, RetryPolicy, is_retryable, open_file, redact_url,
                                   register_webdataset_handlers)
from pipeline.data.transforms import (AugmentConfig, batch_mixer, crop_transform, make_targets,
                                       normalize)

STATE_VERSION = 1
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
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
    images: torch.Tensor            # float [B, 3, H, W], normalised
    labels: torch.Tensor            # long [B] (single-label) | float [B, C] multi-hot
    targets: torch.Tensor           # float [B, C]: smoothed, mixed (train); one/multi-hot (eval)
    keys: list[str]
    epoch: int
    index: int                      # position of this batch in the rank's epoch
    stream: int                     # which reader (DataLoader worker) made it
    skipped: list[SkippedSample] = field(default_factory=list)   # since the stream's last batch
    retries: int = 0                # storage retries since the stream's last batch

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking),
                       targets=self.targets.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:   # called by DataLoader(pin_memory=True)
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(),
                       targets=self.targets.pin_memory())


@dataclass
class LoaderStats:
    samples: int = 0                # samples yielded to the trainer (this process, all epochs)
    batches: int = 0
    skipped: int = 0
    retries: int = 0
    skipped_samples: list[SkippedSample] = field(default_factory=list)   # the first 1000


@dataclass(frozen=True)
class Segment:
    shard: int
    start: int      # sample index within the shard
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StreamPlan:
    batch_sizes: tuple[int, ...]              # this stream's batches, in order
    batch_indices: tuple[int, ...]            # their positions in the rank's epoch
    num_samples: int | None                   # None: resampled (infinite) stream
    segments: Callable[[], Iterator[Segment]]


@dataclass(frozen=True)
class _PlanConfig:
    world_size: int
    rank: int
    num_streams: int
    batch_size: int
    seed: int
    shuffle: bool
    drop_last: bool
    samples_per_epoch: int | None


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


def _split_sizes(num_samples: int, num_batches: int, batch_size: int) -> list[int]:
    """``num_batches`` sizes in 1..batch_size summing to ``num_samples``, full ones first."""
    sizes = [batch_size] * num_batches
    deficit = num_batches * batch_size - num_samples
    j = num_batches - 1
    while deficit > 0:
        cut = min(deficit, batch_size - 1)
        sizes[j] -= cut
        deficit -= cut
        j -= 1
    return sizes


def rank_batch_sizes(num_samples: int, cfg: _PlanConfig) -> tuple[int, int, list[int]]:
    """(first sample of the rank in the epoch sequence, samples of the rank, its batch sizes)."""
    W, B, r = cfg.world_size, cfg.batch_size, cfg.rank
    if cfg.samples_per_epoch is not None:
        batches = max(1, cfg.samples_per_epoch // (W * B))
        return 0, batches * B, [B] * batches
    if cfg.drop_last:
        batches = num_samples // (W * B)
        if batches == 0:
            raise ValueError(f"{num_samples} samples make no full batch of {B} on each of {W} ranks "
                             f"(drop_last=True); use a smaller batch or drop_last=False")
        return r * batches * B, batches * B, [B] * batches
    q, rem = divmod(num_samples, W)
    batches = math.ceil((q + (rem > 0)) / B)
    if q < batches:
        raise ValueError(f"{num_samples} samples cannot give each of {W} ranks the same number of "
                         f"non-empty batches of at most {B}; use fewer ranks or drop_last=True")
    mine = q + (r < rem)
    return r * q + min(r, rem), mine, _split_sizes(mine, batches, B)


def _segments_of_range(order: Sequence[int], counts: Sequence[int], cumulative: Sequence[int],
                       start: int, stop: int) -> list[Segment]:
    """The pieces of ``[start, stop)`` of the concatenation of shards ``order``."""
    segments = []
    i = bisect.bisect_right(cumulative, start) - 1
    pos = start
    while pos < stop:
        shard_start = cumulative[i]
        end = min(stop, cumulative[i + 1])
        if end > pos:
            segments.append(Segment(int(order[i]), pos - shard_start, end - shard_start))
        pos = end
        i += 1
    return segments


def plan_stream(counts: Sequence[int], epoch: int, stream: int, cfg: _PlanConfig) -> StreamPlan:
    """What stream ``stream`` of rank ``cfg.rank`` reads in ``epoch``."""
    rank_start, _, sizes = rank_batch_sizes(sum(counts), cfg)
    K = cfg.num_streams
    mine = list(range(stream, len(sizes), K))
    my_sizes = tuple(sizes[j] for j in mine)

    if cfg.samples_per_epoch is not None:
        probabilities = np.asarray(counts, dtype=np.float64) / sum(counts)

        def resampled() -> Iterator[Segment]:
            rng = _rng(cfg.seed, epoch, cfg.rank, stream, 2)
            while True:
                for shard in rng.choice(len(counts), size=256, p=probabilities):
                    yield Segment(int(shard), 0, counts[shard])

        return StreamPlan(my_sizes, tuple(mine), None, resampled)

    order = _rng(cfg.seed, epoch, 0).permutation(len(counts)) if cfg.shuffle else np.arange(len(counts))
    ordered_counts = [counts[i] for i in order]
    cumulative = [0, *itertools.accumulate(ordered_counts)]
    offset = rank_start + sum(sizes[j] for j in range(len(sizes)) if j % K < stream)
    segments = _segments_of_range(order, counts, cumulative, offset, offset + sum(my_sizes))
    return StreamPlan(my_sizes, tuple(mine), sum(my_sizes), lambda: iter(segments))


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


# ---------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------

class _HashingReader:
    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _tar_samples(tar: tarfile.TarFile, wanted: Callable[[int], bool]
                 ) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """(index in shard, key, {extension: bytes} or None when not wanted), WebDataset grouping:
    consecutive members sharing the name up to the first dot of the file name form a sample."""
    key: str | None = None
    files: dict[str, bytes] = {}
    index, want = -1, False
    for member in tar:
        if not member.isfile():
            continue
        folder, _, filename = member.name.rpartition("/")
        stem, _, ext = filename.partition(".")
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key:
            if key is not None:
                yield index, key, files if want else None
            key, files, index = member_key, {}, index + 1
            want = wanted(index)
        if want:
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError("unexpected end of data")
            files[ext.lower()] = data
    if key is not None:
        yield index, key, files if want else None


@dataclass
class _Raw:
    shard: str
    key: str
    files: dict[str, bytes]


class _StreamReader:
    """Reads a stream's segments in order; yields (position, _Raw | SkippedSample) for every
    position not in ``consumed``; consumed positions are never decoded and whole consumed
    segments never opened."""

    def __init__(self, index: ShardIndex, segments: Iterator[Segment], consumed: set[int],
                 retry: RetryPolicy, verify_checksums: bool,
                 storage_options: dict[str, Any] | None) -> None:
        self.index = index
        self.segments = segments
        self.consumed = consumed
        self.retry = retry
        self.verify_checksums = verify_checksums
        self.storage_options = storage_options
        self.retries = 0

    def __iter__(self) -> Iterator[tuple[int, _Raw | SkippedSample]]:
        base = 0
        for seg in self.segments:
            positions = range(base, base + len(seg))
            needed = [p not in self.consumed for p in positions]
            self.consumed.difference_update(positions)
            if any(needed):
                skip = {seg.start + i for i, need in enumerate(needed) if not need}
                for i, item in self._read_shard(seg, skip):
                    yield base + i - seg.start, item
            base += len(seg)

    def _read_shard(self, seg: Segment, skip: set[int]) -> Iterator[tuple[int, _Raw | SkippedSample]]:
        info = self.index.shards[seg.shard]
        url = self.index.shard_url(seg.shard)
        # The reader of a shard's head verifies it: when its segment ends early (the shard is
        # split between readers) it reads the rest raw, without decoding, to hash the whole file.
        verify = self.verify_checksums and info.sha256 is not None and not skip and seg.start == 0
        next_i = seg.start
        delays = self.retry.delays()
        while next_i < seg.stop:
            reason = None
            try:
                with open_file(url, "rb", self.storage_options) as f:
                    reader = _HashingReader(f)
                    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                        wanted = lambda i: next_i <= i < seg.stop and i not in skip  # noqa: E731
                        for i, key, files in _tar_samples(tar, wanted):
                            if i < next_i:
                                continue
                            if i >= seg.stop:
                                break
                            if files is not None:
                                yield i, _Raw(info.url, key, files)
                            next_i = i + 1
                    if next_i < seg.stop:
                        reason = f"shard ended after {next_i} of {info.num_samples} samples (truncated)"
                    elif verify:
                        reader.drain()
                        if reader.sha256.hexdigest() != info.sha256:
                            raise DataError(f"checksum mismatch for shard {redact_url(url)}: sha256 "
                                            f"{reader.sha256.hexdigest()} but the index says {info.sha256}")
            except DataError:
                raise
            except (tarfile.TarError, EOFError) as exc:
                reason = f"truncated or corrupt tar ({exc})"
            except Exception as exc:
                delay = next(delays, None) if is_retryable(exc) else None
                if delay is not None:
                    self.retries += 1
                    time.sleep(delay)
                    continue
                reason = f"shard failed to open or read ({type(exc).__name__}: {exc})"
            if reason is not None:
                for i in range(next_i, seg.stop):
                    if i not in skip:
                        yield i, SkippedSample(info.url, f"#{i}", reason)
                next_i = seg.stop


# ---------------------------------------------------------------------------------------------
# Decoding and batching (runs in DataLoader workers)
# ---------------------------------------------------------------------------------------------

class _BadSample(Exception):
    pass


def decode_sample(files: dict[str, bytes], label_type: str, num_classes: int
                  ) -> tuple[torch.Tensor, int | list[int]]:
    """uint8 [3, H, W] image and the label(s) of one raw sample; _BadSample if unusable."""
    image_bytes = next((files[e] for e in _IMAGE_EXTENSIONS if e in files), None)
    if image_bytes is None:
        raise _BadSample("no image entry")
    label: int | list[int]
    try:
        if label_type == "single":
            if "cls" not in files:
                raise _BadSample("missing label")
            label = int(files["cls"].decode().strip())
            labels = [label]
        else:
            if "json" not in files:
                raise _BadSample("missing label")
            labels = [int(x) for x in json.loads(files["json"])["labels"]]
            label = labels
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _BadSample(f"unparseable label ({exc})") from exc
    if not labels or any(not 0 <= x < num_classes for x in labels):
        raise _BadSample(f"label out of range: {labels} (num_classes={num_classes})")
    try:
        image = decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
    except Exception as exc:
        raise _BadSample(f"corrupt image ({type(exc).__name__})") from exc
    return image, label


@dataclass(frozen=True)
class _StreamJob:
    index: ShardIndex
    plan: _PlanConfig
    epoch: int
    consumed: tuple[int, ...]
    img_size: int
    train: bool
    augment: AugmentConfig
    shuffle_buffer: int
    retry: RetryPolicy
    verify_checksums: bool
    storage_options: dict[str, Any] | None


def stream_batches(job: _StreamJob, stream: int) -> Iterator[Batch]:
    """The batches of one stream of one rank for one epoch, after ``job.consumed[stream]``."""
    index, cfg = job.index, job.plan
    plan = plan_stream([s.num_samples for s in index.shards], job.epoch, stream, cfg)
    shuffle_rng = _rng(cfg.seed, job.epoch, cfg.rank, stream, 1) if cfg.shuffle else None
    positions = shuffled_positions(plan.num_samples, job.shuffle_buffer, shuffle_rng)
    done = job.consumed[stream]
    consumed = set(itertools.islice(positions, sum(plan.batch_sizes[:done])))
    reader = _StreamReader(index, plan.segments(), consumed, job.retry, job.verify_checksums,
                           job.storage_options)
    items = iter(reader)
    read_ahead: dict[int, _Raw | SkippedSample] = {}
    transform = crop_transform(job.augment, job.img_size, job.train)
    to_float = normalize(job.augment)
    mixer = batch_mixer(job.augment) if job.train else None
    smoothing = job.augment.label_smoothing if job.train else 0.0
    retries_reported = 0

    for size, batch_index in zip(plan.batch_sizes[done:], plan.batch_indices[done:]):
        images, labels, keys, skipped = [], [], [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(_rng(cfg.seed, job.epoch, cfg.rank, batch_index, 3).integers(2**62)))
            for p in itertools.islice(positions, size):
                while p not in read_ahead:
                    position, item = next(items)
                    read_ahead[position] = item
                item = read_ahead.pop(p)
                if isinstance(item, SkippedSample):
                    skipped.append(item)
                    continue
                try:
                    image, label = decode_sample(item.files, index.label_type, index.num_classes)
                except _BadSample as exc:
                    skipped.append(SkippedSample(item.shard, item.key, str(exc)))
                    continue
                images.append(transform(image))
                labels.append(label)
                keys.append(item.key)
            if index.label_type == "single":
                label_tensor = torch.tensor(labels, dtype=torch.long)
            else:
                label_tensor = torch.zeros(len(labels), index.num_classes)
                for row, sample_labels in enumerate(labels):
                    label_tensor[row, sample_labels] = 1.0
            image_tensor = to_float(torch.stack(images) if images
                                    else torch.empty(0, 3, job.img_size, job.img_size, dtype=torch.uint8))
            targets = make_targets(label_tensor, index.num_classes, smoothing)
            if mixer is not None and len(keys) > 1:
                image_tensor, targets = mixer(image_tensor, targets)
        yield Batch(image_tensor, label_tensor, targets, keys, job.epoch, batch_index, stream,
                    skipped, reader.retries - retries_reported)
        retries_reported = reader.retries
    if plan.num_samples is not None:
        # Run a finite reader to its end: the last shard's checksum is verified there.
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

    ``len(loader)`` is the number of batches per epoch, identical on every rank. Iterating yields
    the epoch's remaining batches; after a complete pass the loader moves to the next epoch.
    ``set_epoch(e)`` starts epoch ``e`` from its beginning, unless ``e`` is the current epoch
    (so a restored mid-epoch position survives the usual ``set_epoch`` call of a training loop).
    ``state_dict()`` is identical on every rank; restoring it continues the epoch where it
    stopped: no consumed batch again, none skipped (batches prefetched but not yet handed out are
    simply produced again).
    """

    def __init__(self, index: ShardIndex | str, *, rank: int = 0, world_size: int = 1,
                 batch_size: int, img_size: int = 224, train: bool = True, seed: int = 0,
                 num_workers: int = 2, augment: AugmentConfig | None = None,
                 samples_per_epoch: int | None = None, max_skip_fraction: float = 0.001,
                 shuffle: bool | None = None, shuffle_buffer: int = 1000, drop_last: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2, verify_checksums: bool = True,
                 retry: RetryPolicy | None = None, storage_options: dict[str, Any] | None = None,
                 multiprocessing_context: str | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or num_workers < 0 or img_size < 8:
            raise ValueError("batch_size must be >= 1, num_workers >= 0 and img_size >= 8")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        if not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index, storage_options)
        if self.index.num_samples == 0:
            raise DataError(f"shard index under {redact_url(self.index.root)} has no samples")
        self.train = train
        self.img_size = img_size
        self.num_workers = num_workers
        self.augment = augment or AugmentConfig()
        self.max_skip_fraction = max_skip_fraction
        self.shuffle_buffer = shuffle_buffer
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.verify_checksums = verify_checksums
        self.retry = retry or RetryPolicy()
        self.storage_options = storage_options
        self.multiprocessing_context = multiprocessing_context
        self.plan = _PlanConfig(world_size=world_size, rank=rank, num_streams=max(1, num_workers),
                                batch_size=batch_size, seed=seed,
                                shuffle=train if shuffle is None else shuffle,
                                drop_last=drop_last, samples_per_epoch=samples_per_epoch)
        _, self._rank_samples, sizes = rank_batch_sizes(self.index.num_samples, self.plan)
        self._num_batches = len(sizes)
        register_webdataset_handlers()   # for webdataset users in this process; workers do it too
        self.stats = LoaderStats()
        self._epoch = 0
        self._consumed = [0] * self.plan.num_streams
        self._skipped_in_epoch = 0

    # -- position ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_remaining(self) -> int:
        return self._num_batches - sum(self._consumed)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._consumed = [0] * self.plan.num_streams
            self._skipped_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        p = self.plan
        return {"version": STATE_VERSION, "epoch": self._epoch, "consumed": list(self._consumed),
                "batches_consumed": sum(self._consumed), "skipped_in_epoch": self._skipped_in_epoch,
                "index": self.index.fingerprint(), "seed": p.seed, "world_size": p.world_size,
                "batch_size": p.batch_size, "num_streams": p.num_streams, "shuffle": p.shuffle,
                "drop_last": p.drop_last, "samples_per_epoch": p.samples_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["index"] != self.index.fingerprint():
            raise ValueError("loader state was saved on a different shard index (dataset changed)")
        mine = self.state_dict()
        if any(state["consumed"]):
            fields = ("seed", "world_size", "batch_size", "num_streams", "shuffle", "drop_last",
                      "samples_per_epoch")
            changed = {f: (state[f], mine[f]) for f in fields if state[f] != mine[f]}
            if changed:
                raise ValueError(f"cannot resume mid-epoch with a different plan {changed} "
                                 f"(saved, now); resume with the same settings or at an epoch start")
        self._epoch = int(state["epoch"])
        self._consumed = [int(c) for c in state["consumed"]] if any(state["consumed"]) \
            else [0] * self.plan.num_streams
        self._skipped_in_epoch = int(state.get("skipped_in_epoch", 0))

    # -- iteration -----------------------------------------------------------------------------

    def _job(self) -> _StreamJob:
        return _StreamJob(self.index, self.plan, self._epoch, tuple(self._consumed), self.img_size,
                          self.train, self.augment, self.shuffle_buffer, self.retry,
                          self.verify_checksums, self.storage_options)

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
        if len(batch) == 0:
            raise DataError(f"batch {batch.index} of epoch {batch.epoch} has no readable sample: "
                            + "; ".join(str(s) for s in batch.skipped[:5]))

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
                            f"{self._num_batches - self.batches_remaining} of {self._num_batches} "
                            f"batches in epoch {self._epoch}")
        self.set_epoch(self._epoch + 1)
