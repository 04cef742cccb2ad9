"""The streaming loader: one rank's batches from WebDataset shards, the same number on every rank,
with a resumable position that survives a change of world size or worker count.

Each epoch is planned in the rank's main process by ``plan_epoch`` (the exact (rank, worker)
split, the shuffle on sample positions and the elastic resume: the algorithm is in
pipeline/data/plan.py). Each DataLoader worker receives only its own stream's plan and shard rows,
reads its shards (``StreamReader``, pipeline/data/reader.py) without decoding the positions
already consumed, then decodes, crops and batches them, seeded per batch; ``state_dict()`` records
the plans the epoch ran under and how many batches of each stream were handed out.

Output: ``output="float"`` (default) yields normalised float images with their targets, made in
the workers; ``output="uint8"`` yields the cropped uint8 images (4x fewer bytes to hand over and
pin) with ``targets=None`` and the batch's ``seed``: ``DeviceBatchTransform`` then normalises,
smooths, mixes (and, with ``augment.randaug_device``, runs RandAugment) on the training device,
giving the same batch as the float path would (the same seed drives both).

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
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.cropdecode import CropDecoder
from pipeline.data.devicedecode import CropDrawer, DecodeStats, EncodedImages, decode_rows
from pipeline.data.index import ShardIndex
from pipeline.data.plan import (EpochSequence, Generation, PlanConfig, StreamPlan, batch_seed, batch_transform_seed,
                                plan_epoch, rank_batch_sizes, read_order, shuffle_rng)
from pipeline.data.reader import (DEFAULT_MAX_PIXELS, BadSample, RawSample, SkippedSample, StreamReader, decode_sample,
                                  image_entry, parse_labels)
from pipeline.data.storage import DataError, register_webdataset_handlers
from pipeline.data.transforms import AugmentConfig, DeviceBatchTransform, crop_transform
from pipeline.redact import redact
from pipeline.retry import RetryPolicy

STATE_VERSION = 2
DEFAULT_INTERLEAVE = 32       # shards a loader worker reads at once (lanes) in a shuffled epoch
_MAX_SKIP_RECORDS = 1000


# ---------------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor            # float [B, 3, H, W] normalised | uint8 (output="uint8"); with
                                    # ``encoded``: only the rows the worker decoded, in batch order
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
    encoded: EncodedImages | None = None   # decode="device": JPEGs to decode on the device

    def __len__(self) -> int:
        return len(self.keys)

    def decoded_images(self, device: torch.device | str, non_blocking: bool = False,
                       stats: DecodeStats | None = None) -> torch.Tensor:
        """All of the batch's images on ``device`` (the ``encoded`` ones decoded there)."""
        return decode_rows(self.images, self.encoded, device, self.keys, stats, non_blocking)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device``, its encoded images decoded there."""
        targets = None if self.targets is None else self.targets.to(device, non_blocking=non_blocking)
        return replace(self, images=self.decoded_images(device, non_blocking), encoded=None,
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


# ---------------------------------------------------------------------------------------------
# Decoding and batching (runs in DataLoader workers)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
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
    decode: Literal["worker", "device"] = "worker"
    label_key: str | None = None                  # existing shards: how labels are read (index)
    class_index: dict[str, int] | None = None     # class name -> index, for such labels


def _sample_tensor(item: RawSample, job: _StreamJob, transform: Any,
                   crop_decoder: CropDecoder | None = None) -> tuple[torch.Tensor, int | list[int]]:
    """One sample through decode, conversion and the per-sample transform (a JPEG through
    ``crop_decoder`` when given: decode and crop in one); BadSample if any step fails or the
    result is not a [3, img_size, img_size] uint8 image."""
    jpeg = next((item.files[e] for e in ("jpg", "jpeg") if e in item.files), None)
    out: torch.Tensor | None = None
    if crop_decoder is not None and jpeg is not None:
        label = parse_labels(item.files, job.label_type, job.num_classes, job.label_key, job.class_index)
        try:
            out = crop_decoder(jpeg)
        except BadSample:
            raise
        except Exception as exc:
            raise BadSample(f"transform failed ({type(exc).__name__}: {exc})") from exc
    if out is None:
        image, label = decode_sample(item.files, job.label_type, job.num_classes, job.max_pixels,
                                     job.label_key, job.class_index)
        try:
            out = transform(image)
        except Exception as exc:
            raise BadSample(f"transform failed ({type(exc).__name__}: {exc})") from exc
    if out.shape != (3, job.img_size, job.img_size) or out.dtype != torch.uint8:
        raise BadSample(f"transform gave {tuple(out.shape)} {out.dtype}, expected "
                        f"(3, {job.img_size}, {job.img_size}) uint8")
    return out, label


def _deferred(item: RawSample, job: _StreamJob, drawer: CropDrawer
              ) -> tuple[bytes, tuple[int, int, int, int, bool], int | list[int]] | None:
    """decode="device": (JPEG bytes, drawn box and flip, label) of a sample the device decodes;
    None: decode it here. The label first, as ``decode_sample`` does: a sample skipped for its
    label draws nothing, on either path."""
    data = image_entry(item.files)
    if data is None:
        return None
    label = parse_labels(item.files, job.label_type, job.num_classes, job.label_key, job.class_index)
    box = drawer(data)
    return None if box is None else (data, box, label)


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
    rng = shuffle_rng(cfg, job.epoch, stream, job.generation)
    positions = read_order(plan.position_shard, cfg, rng)     # lanes: several shards at once
    done = job.consumed[stream]
    consumed = set(itertools.islice(positions, sum(plan.batch_sizes[:done])))
    reader = StreamReader(job.root, plan, consumed, job.retry, job.verify_checksums, job.storage_options,
                          job.label_key, lanes=cfg.lanes if rng is not None else 1)
    items = iter(reader)
    read_ahead: dict[int, RawSample | SkippedSample] = {}
    transform = crop_transform(job.augment, job.img_size, job.train)
    crop_decoder = (CropDecoder(job.augment, job.img_size, job.max_pixels)
                    if job.train and job.crop_decode else None)
    drawer = (CropDrawer(job.img_size, job.augment.crop_scale, job.augment.crop_ratio, job.augment.hflip,
                         job.max_pixels) if job.decode == "device" else None)
    per_batch = DeviceBatchTransform(job.augment, job.num_classes, job.label_type,  # type: ignore[arg-type]
                                     train=job.train)
    retries_reported = 0

    for size, batch_index in zip(plan.batch_sizes[done:], plan.batch_indices[done:]):
        images, labels, keys, skipped = [], [], [], []
        files, rows, boxes = [], [], []        # decode="device": what the device decodes
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
                    deferred = _deferred(item, job, drawer) if drawer is not None else None
                    if deferred is None:
                        image, label = _sample_tensor(item, job, transform, crop_decoder)
                except BadSample as exc:
                    skipped.append(SkippedSample(item.shard, item.key, str(exc)))
                    continue
                if deferred is not None:
                    files.append(deferred[0])
                    boxes.append(deferred[1])
                    rows.append(len(keys))
                    label = deferred[2]
                else:
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
            encoded = (EncodedImages.pack(files, rows, boxes, job.img_size, job.augment.interpolation)
                       if files else None)
        seed = batch_transform_seed(cfg, job.epoch, batch_index, job.generation)
        targets: torch.Tensor | None = None
        if job.output == "float":
            image_tensor, targets = per_batch.apply(image_tensor, label_tensor, seed)
        yield Batch(image_tensor, label_tensor, targets, keys, job.epoch, batch_index, stream,
                    skipped, reader.retries - retries_reported, seed, encoded)
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
                 output: Literal["float", "uint8"] = "float", crop_decode: bool = False,
                 interleave: int = DEFAULT_INTERLEAVE, decode: Literal["worker", "device"] = "worker") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or num_workers < 0 or img_size < 8 or interleave < 1:
            raise ValueError("batch_size and interleave must be >= 1, num_workers >= 0 and img_size >= 8")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        augment = augment or AugmentConfig()
        if decode not in ("worker", "device"):
            raise ValueError(f"decode must be 'worker' or 'device', got {decode!r}")
        if decode == "device":
            if output != "uint8" or not train or crop_decode:
                raise ValueError("decode='device' needs output='uint8' and train=True, without crop_decode "
                                 "(the batch transform decodes the training crops on its device)")
            if augment.randaug_n > 0 and not augment.randaug_device:
                raise ValueError("decode='device' needs augment.randaug_device=True (or randaug_n=0): the "
                                 "worker has no pixels to run RandAugment on")
        if not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index, storage_options)
        if self.index.num_samples == 0:
            raise DataError(f"shard index under {redact(self.index.root)} has no samples")
        self.train = train
        self.img_size = img_size
        self.num_workers = num_workers
        self.augment = augment
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
        self.decode = decode
        self.plan = PlanConfig(world_size=world_size, rank=rank, num_streams=max(1, num_workers),
                               batch_size=batch_size, seed=seed,
                               shuffle=train if shuffle is None else shuffle,
                               drop_last=drop_last, samples_per_epoch=samples_per_epoch,
                               shuffle_buffer=shuffle_buffer, lanes=interleave)
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
                          tuple(self._consumed), p.lanes)

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
        """Continue from ``state``: the same epoch, at this loader's world size, workers and batch
        size (another of any of them starts a new generation of the plan).

        Mid-epoch, the seed, shuffle, drop_last and samples_per_epoch must match (and, for a
        resampled epoch, the world size, workers and batch size too); otherwise ValueError."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["index"] != self.index.fingerprint() and state["index"] != self.index.legacy_fingerprint():
            raise ValueError("loader state was saved on a different shard index (dataset changed)")
        p = self.plan
        mine = self.state_dict()
        saved = [Generation(g["world_size"], g["num_streams"], g["batch_size"], g["drop_last"],
                            g["shuffle_buffer"], tuple(int(c) for c in g["consumed"]), int(g.get("lanes", 1)))
                 for g in state.get("generations", [])]
        if not saved:      # version 1: one generation, with this loader's shuffle buffer and lanes
            saved = [Generation(state["world_size"], state["num_streams"], state["batch_size"],
                                state["drop_last"], p.shuffle_buffer,
                                tuple(int(c) for c in state["consumed"]), p.lanes)]
        started = any(any(g.consumed) for g in saved)
        if started:
            fields = ["seed", "shuffle", "drop_last", "samples_per_epoch"]
            if p.samples_per_epoch is not None:
                fields += ["world_size", "num_streams", "batch_size"]
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
        elif (last.world_size, last.num_streams, last.shuffle_buffer, last.batch_size, last.lanes) == \
                (p.world_size, p.num_streams, p.shuffle_buffer, p.batch_size, p.lanes):
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
        return _StreamJob(root=self.index.root, label_type=self.index.label_type,
                          num_classes=self.index.num_classes, plan=self.plan, epoch=self._epoch,
                          generation=len(self._generations), streams=tuple(streams),
                          consumed=tuple(self._consumed), img_size=self.img_size, train=self.train,
                          augment=self.augment, retry=self.retry, verify_checksums=self.verify_checksums,
                          storage_options=self.storage_options, max_pixels=self.max_image_pixels,
                          output=self.output, crop_decode=self.crop_decode, decode=self.decode,
                          label_key=self.index.label_key,
                          class_index=({n: i for i, n in enumerate(self.index.class_names)}
                                       if self.index.label_key is not None else None))

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
