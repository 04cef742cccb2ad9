"""Writing WebDataset shards (+ index) from an ImageFolder, a CSV/Parquet manifest or the demo set.

Layout written under DEST (a local path or any fsspec URL)::

    DEST/{split}/shard-000000.tar      {key}.jpg|png|webp + {key}.cls (single) | {key}.json (multi)
    DEST/{split}/_progress/shard-000000.json   per-shard record: makes reruns resumable
    DEST/{split}/index.parquet         written last (then index.json, for small splits); readers
                                       rely on it and never list the bucket

The source's rows are cut into *parts* of ``samples_per_shard * shards_per_part`` rows; a part is
one task (of a process pool, or of Ray with ``executor="ray"``) that writes its consecutive shards,
skipping those whose record matches and whose tar has the recorded size. Every part's keys and shard
numbers follow from row counts alone, so the plan is made up front and any executor writes the
same bytes. Sample keys are the position of the input within its split (at least 9 digits). The
sources are listed or streamed by pipeline/data/sources.py:

- A folder or a CSV manifest is listed in memory, sorted, then permuted with ``seed`` (so every
  shard mixes classes).
- A Parquet manifest is streamed: the driver reads its footer (and, without ``class_names``, the
  label column batch by batch); each part task reads its own row range. Rows are permuted within
  their part only (``pre_shuffled`` is then false in the index): shuffle a class-sorted manifest
  first, or rely on the loader's shard shuffle and sample buffer.
- ``val_fraction``: the first rows of each (permuted) part go to ``val``, in proportion.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from pipeline.data.demo import DEMO_CLASSES, demo_jpeg
from pipeline.data.index import LabelType, ShardIndex, ShardInfo
from pipeline.data.reader import pil_to_rgb8
from pipeline.data.sources import InputItem, ManifestRows, SkippedInput, list_image_folder, read_manifest, scan_manifest
from pipeline.data.storage import DataError, exists, join_url, open_file, read_bytes, url_to_fs
from pipeline.redact import redact
from pipeline.retry import RetryPolicy, call_with_retry

_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}   # kept verbatim unless resized
_DEMO_PREFIX = "demo:"
_VOLATILE_OPTIONS = ("num_workers", "progress", "executor")   # how a shard is written, not what


@dataclass(frozen=True)
class ShardOptions:
    samples_per_shard: int = 1000
    max_side: int | None = None   # shrink so the longer side is at most this (re-encodes as JPEG)
    reencode: bool = False        # re-encode every image as JPEG even when no resize is needed
    quality: int = 90
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True
    seed: int = 0                 # input permutation and val split
    shards_per_part: int = 16     # shards per task; a part of a Parquet manifest is permuted as one
    executor: Literal["local", "ray"] = "local"   # "ray": one Ray task per part (see ray_session)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.shards_per_part < 1:
            raise ValueError(f"shards_per_part must be >= 1, got {self.shards_per_part}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"max_side must be >= 8 pixels, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")


@dataclass(frozen=True)
class DemoSpec:
    image_size: int = 64
    seed: int = 0
    multi_label: bool = False


@dataclass
class SplitSummary:
    split: str
    index_url: str
    num_samples: int
    num_shards: int
    num_bytes: int
    shards_written: int
    shards_reused: int
    skipped: list[SkippedInput]


@dataclass
class WriteSummary:
    splits: dict[str, SplitSummary]

    @property
    def skipped(self) -> list[SkippedInput]:
        return [s for split in self.splits.values() for s in split.skipped]

    def format(self, examples: int = 3) -> str:
        lines = []
        for s in self.splits.values():
            lines.append(f"{s.split}: {s.num_samples} samples in {s.num_shards} shards "
                         f"({s.num_bytes / 1e6:.1f} MB; {s.shards_written} written, "
                         f"{s.shards_reused} already complete) -> {redact(s.index_url)}")
        skipped = self.skipped
        lines.append(f"skipped inputs: {len(skipped)}")
        for reason, count in Counter(s.reason for s in skipped).most_common():
            names = [s.source for s in skipped if s.reason == reason][:examples]
            lines.append(f"  {count} x {reason}: {', '.join(names)}{' ...' if count > examples else ''}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Writing one shard
# ---------------------------------------------------------------------------------------------

class _BadInput(Exception):
    pass


class _HashingWriter:
    """Write-through file wrapper recording sha256 and size of everything written."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._f.write(data)
        return len(data)


@dataclass(frozen=True)
class _Dataset:
    """What every shard of a split shares (shipped once per part task)."""
    split_url: str
    label_type: LabelType
    num_classes: int
    options: ShardOptions
    demo: DemoSpec | None
    storage_options: dict[str, Any] | None
    key_width: int = 9
    shard_width: int = 6


@dataclass(frozen=True)
class _Shard:
    dataset: _Dataset
    shard: int
    first_key: int
    inputs: tuple[InputItem | SkippedInput, ...]   # a SkippedInput: a manifest row already known bad

    @property
    def name(self) -> str:
        return f"shard-{self.shard:0{self.dataset.shard_width}d}.tar"

    @property
    def tar_url(self) -> str:
        return join_url(self.dataset.split_url, self.name)

    @property
    def record_url(self) -> str:
        return join_url(self.dataset.split_url, "_progress", self.name.replace(".tar", ".json"))

    def fingerprint(self) -> str:
        d = self.dataset
        opts = asdict(d.options)
        for volatile in _VOLATILE_OPTIONS:
            opts.pop(volatile)
        inputs = [_input_identity(i) if isinstance(i, InputItem) else {"skipped": asdict(i)} for i in self.inputs]
        payload = json.dumps([self.first_key, d.key_width, inputs, d.label_type, d.num_classes, opts,
                              asdict(d.demo) if d.demo else None], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


def _input_identity(item: InputItem) -> dict[str, Any]:
    """What a shard's record fingerprints of an input: its source and labels, and for embedded
    bytes (a Parquet manifest holding images) their digest, not the bytes."""
    out: dict[str, Any] = {"source": item.source, "labels": item.labels}
    if item.data is not None:
        out["sha1"] = hashlib.sha1(item.data).hexdigest()
    return out


def _encode_image(data: bytes, options: ShardOptions) -> tuple[bytes, str]:
    try:
        image = Image.open(io.BytesIO(data))
        image_format = image.format
        image.load()   # a full decode: corrupt or truncated files fail here, not in training
    except Image.DecompressionBombError as exc:
        raise _BadInput(f"decompression bomb ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _BadInput(f"corrupt or unsupported image ({type(exc).__name__})") from exc
    except Exception as exc:   # a decoder bug on a hostile file must not end the split
        raise _BadInput(f"unreadable image ({type(exc).__name__}: {exc})") from exc
    too_big = options.max_side is not None and max(image.size) > options.max_side
    if image_format in _STORED_FORMATS and not too_big and not options.reencode:
        return data, _STORED_FORMATS[image_format]
    try:
        image = Image.fromarray(pil_to_rgb8(image))
        if too_big:
            image.thumbnail((options.max_side, options.max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=options.quality)
    except Exception as exc:
        raise _BadInput(f"cannot convert to 8-bit RGB ({type(exc).__name__}: {exc})") from exc
    return buf.getvalue(), "jpg"


def _load_input(item: InputItem, d: _Dataset) -> tuple[bytes, str, tuple[int, ...]]:
    if item.source.startswith(_DEMO_PREFIX):
        demo = d.demo or DemoSpec()
        data, labels = demo_jpeg(int(item.source[len(_DEMO_PREFIX):]), demo.image_size, demo.seed,
                                 demo.multi_label, d.options.quality)
    elif item.data is not None:
        data, labels = item.data, item.labels
    else:
        try:
            data = call_with_retry(lambda: read_bytes(item.source, d.storage_options), RetryPolicy())
        except FileNotFoundError as exc:
            raise _BadInput("file not found") from exc
        except OSError as exc:
            raise _BadInput(f"unreadable ({type(exc).__name__})") from exc
        labels = item.labels
    if any(not 0 <= label < d.num_classes for label in labels) or not labels:
        raise _BadInput("missing or out-of-range label")
    encoded, ext = _encode_image(data, d.options)
    return encoded, ext, labels


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0   # deterministic bytes: a rerun writes the same shard, same checksum
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(shard: _Shard) -> dict[str, Any]:
    d = shard.dataset
    skipped: list[SkippedInput] = []
    num_samples = 0
    with open_file(shard.tar_url, "wb", d.storage_options) as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
            for offset, item in enumerate(shard.inputs):
                if isinstance(item, SkippedInput):
                    skipped.append(item)
                    continue
                key = f"{shard.first_key + offset:0{d.key_width}d}"
                try:
                    data, ext, labels = _load_input(item, d)
                except _BadInput as exc:
                    skipped.append(SkippedInput(redact(item.source), str(exc)))
                    continue
                _add_member(tar, f"{key}.{ext}", data)
                if d.label_type == "single":
                    _add_member(tar, f"{key}.cls", str(labels[0]).encode())
                else:
                    _add_member(tar, f"{key}.json", json.dumps({"labels": list(labels)}).encode())
                num_samples += 1
    record = {"task": shard.fingerprint(), "num_samples": num_samples,
              "sha256": out.sha256.hexdigest(), "size_bytes": out.size,
              "skipped": [asdict(s) for s in skipped]}
    # written last: a shard without its record (a kill mid-write) is written again
    with open_file(shard.record_url, "wb", d.storage_options) as f:
        f.write(json.dumps(record).encode())
    return record


def _completed_record(shard: _Shard) -> dict[str, Any] | None:
    """The record of an earlier run that wrote exactly this shard, if its tar is intact."""
    d = shard.dataset
    try:
        record = json.loads(read_bytes(shard.record_url, d.storage_options))
        fs, path = url_to_fs(shard.tar_url, d.storage_options)
        if record.get("task") == shard.fingerprint() and fs.size(path) == record["size_bytes"]:
            return record
    except (OSError, json.JSONDecodeError, KeyError):   # absent or unreadable: write it again
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Parts: the unit of work of the pool or of a Ray task
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    """Consecutive rows of a split's source, written as consecutive shards. ``rows`` are in memory
    (listings, the demo) or a range of a Parquet manifest that the task reads. Streamed rows are
    permuted within the part (seeded by part), then positions ``take`` go to this split (the first
    ones of each part to ``val``, the rest to ``train``, so both splits' tasks of a part agree)."""
    dataset: _Dataset
    part: int
    rows: tuple[InputItem, ...] | ManifestRows
    take: tuple[int, int]
    first_key: int
    first_shard: int
    permute_seed: int | None = None

    @property
    def num_inputs(self) -> int:
        return self.take[1] - self.take[0]

    def shards(self) -> list[_Shard]:
        rows: Sequence[InputItem | SkippedInput] = (self.rows.read() if isinstance(self.rows, ManifestRows)
                                                    else self.rows)
        if self.permute_seed is not None:
            order = np.random.default_rng([self.permute_seed, self.part]).permutation(len(rows))
            rows = [rows[i] for i in order]
        rows = rows[self.take[0]:self.take[1]]
        n = self.dataset.options.samples_per_shard
        return [_Shard(self.dataset, self.first_shard + j, self.first_key + j * n, tuple(rows[j * n:(j + 1) * n]))
                for j in range(math.ceil(len(rows) / n))]


def write_part(part: _Part) -> list[tuple[int, dict[str, Any], bool]]:
    """Verify or write every shard of ``part``: [(shard, record, reused)]. Idempotent: a retried
    or re-run part rewrites only the shards without an intact record."""
    out = []
    for shard in part.shards():
        record = _completed_record(shard)
        out.append((shard.shard, record or _write_shard(shard), record is not None))
    return out


def _part_result(part: _Part, result: Any) -> list[tuple[int, dict[str, Any], bool]]:
    """``result()``, with a failure to write the part turned into a readable DataError."""
    try:
        return result()
    except Exception as exc:
        first = f"shard-{part.first_shard:0{part.dataset.shard_width}d}.tar"
        raise DataError(f"writing {redact(join_url(part.dataset.split_url, first))} failed: "
                        f"{type(exc).__name__}: {exc} (a rerun resumes with the shards already complete)") from exc


def _run_parts(parts: Sequence[_Part], options: ShardOptions,
               bar: tqdm) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """Every part's shard records, parts run on Ray tasks, a process pool or in this process."""
    if options.executor == "ray":
        yield from _run_parts_on_ray(parts, bar)
    elif options.num_workers > 1 and len(parts) > 1:
        with cf.ProcessPoolExecutor(max_workers=min(options.num_workers, len(parts))) as pool:
            futures = {pool.submit(write_part, part): part for part in parts}
            for future in cf.as_completed(futures):
                part = futures[future]
                yield from _part_result(part, future.result)
                bar.update(part.num_inputs)
    else:
        for part in parts:
            yield from _part_result(part, lambda: write_part(part))
            bar.update(part.num_inputs)


def _run_parts_on_ray(parts: Sequence[_Part], bar: tqdm) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """One Ray task per part, at most two per cluster CPU in flight (the driver holds the plan,
    not 10^5 pending tasks). A task lost with its node is retried; a part is idempotent."""
    import ray

    from pipeline.cluster import worker_env

    task = ray.remote(num_cpus=1, max_retries=3)(write_part).options(
        runtime_env={"env_vars": worker_env()})
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    todo = iter(parts)
    pending: dict[Any, _Part] = {}
    while True:
        while len(pending) < window and (part := next(todo, None)) is not None:
            pending[task.remote(part)] = part
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        part = pending.pop(done[0])
        yield from _part_result(part, lambda: ray.get(done[0]))
        bar.update(part.num_inputs)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def _digits(n: int, at_least: int) -> int:
    return max(at_least, len(str(max(n - 1, 0))))


def _plan_parts(dataset: _Dataset, num_rows: int, rows_of: Any, takes: Sequence[tuple[int, int]],
                part_rows: int, permute_seed: int | None) -> list[_Part]:
    """Parts of ``part_rows`` source rows; ``takes[p]``: the positions part p gives this split.
    Keys and shard numbers follow from the counts alone, so every part is planned up front."""
    parts, key, shard = [], 0, 0
    n = dataset.options.samples_per_shard
    for p, (lo, hi) in enumerate(takes):
        if hi == lo:
            continue
        start, end = p * part_rows, min(num_rows, (p + 1) * part_rows)
        parts.append(_Part(dataset, p, rows_of(start, end), (lo, hi), key, shard, permute_seed))
        key += hi - lo
        shard += math.ceil((hi - lo) / n)
    return parts


def _with_widths(dataset: _Dataset, num_rows: int) -> _Dataset:
    shards = math.ceil(num_rows / dataset.options.samples_per_shard)
    return replace(dataset, key_width=_digits(num_rows, 9), shard_width=_digits(shards, 6))


def _write_split(parts: Sequence[_Part], split: str, class_names: Sequence[str], description: str,
                 listing_skipped: list[SkippedInput], extra_meta: dict[str, Any] | None = None,
                 pre_shuffled: bool = True) -> SplitSummary:
    dataset = parts[0].dataset
    options = dataset.options
    records: dict[int, dict[str, Any]] = {}
    reused = 0
    with tqdm(total=sum(p.num_inputs for p in parts), unit="img", desc=f"{split} shards",
              disable=not options.progress) as bar:
        for shard, record, was_reused in _run_parts(parts, options, bar):
            records[shard] = record
            reused += was_reused
    width = dataset.shard_width
    shards = [ShardInfo(url=f"shard-{i:0{width}d}.tar", num_samples=records[i]["num_samples"],
                        sha256=records[i]["sha256"], size_bytes=records[i]["size_bytes"])
              for i in sorted(records) if records[i]["num_samples"] > 0]
    skipped = list(listing_skipped) + [SkippedInput(**s) for i in sorted(records)
                                       for s in records[i]["skipped"]]
    index = ShardIndex(root=dataset.split_url, shards=tuple(shards), class_names=tuple(class_names),
                       label_type=dataset.label_type, split=split, pre_shuffled=pre_shuffled,
                       meta={"source": description,
                             "key_format": f"{dataset.key_width}-digit position in split",
                             "samples_per_shard": options.samples_per_shard,
                             "shards_per_part": options.shards_per_part,
                             "max_side": options.max_side, "skipped_inputs": len(skipped),
                             **(extra_meta or {})})
    if index.num_samples == 0:
        raise DataError(f"{description}: no usable samples for split {split!r} "
                        f"({len(skipped)} inputs skipped)")
    index_url = index.save(dataset.storage_options)
    return SplitSummary(split, index_url, index.num_samples, len(shards), index.shards.total_bytes,
                        len(records) - reused, reused, skipped)


def _split_takes(sizes: Sequence[int], val_fraction: float, split: str | None) -> dict[str, list[tuple[int, int]]]:
    """Per split, the positions ``(lo, hi)`` each part gives it: with ``val_fraction``, the first
    ``round(V * end / N) - round(V * start / N)`` of each part go to val (V val inputs in all)."""
    if val_fraction <= 0:
        return {split or "train": [(0, n) for n in sizes]}
    total = sum(sizes)
    num_val = max(1, round(val_fraction * total))
    val_before = lambda rows: round(num_val * rows / total)  # noqa: E731
    takes: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
    start = 0
    for n in sizes:
        v = val_before(start + n) - val_before(start)
        takes["train"].append((v, n))
        takes["val"].append((0, v))
        start += n
    return takes


@contextmanager
def _executor(options: ShardOptions) -> Iterator[None]:
    if options.executor == "ray":
        from pipeline.cluster import ray_session

        with ray_session(num_cpus=options.num_workers):
            yield
    else:
        yield


def write_shards(source: str, dest: str, *, split: str | None = None, val_fraction: float = 0.0,
                 options: ShardOptions | None = None, class_names: Sequence[str] | None = None,
                 storage_options: dict[str, Any] | None = None) -> WriteSummary:
    """Shard ``source`` (an ImageFolder folder, a .csv manifest, or a .parquet manifest, which
    is streamed; local or fsspec URL) into ``dest``. With ``val_fraction`` > 0 the inputs are split
    into ``train`` and ``val``; otherwise everything goes to ``split`` (default ``train``)."""
    options = options or ShardOptions()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and split is not None:
        raise ValueError("give either val_fraction (train + val) or split, not both")
    part_rows = options.samples_per_shard * options.shards_per_part
    if source.lower().endswith(".parquet"):
        manifest = scan_manifest(source, class_names, storage_options)
        num_rows, names, label_type = manifest.num_rows, manifest.class_names, manifest.label_type
        rows_of = lambda start, end: ManifestRows(manifest, start, end, storage_options)  # noqa: E731
        permute_seed: int | None = options.seed
        description, listing_skipped, pre_shuffled = f"manifest {redact(source)}", [], False
    else:
        if source.lower().endswith(".csv"):
            listing = read_manifest(source, class_names, storage_options)
        else:
            listing = list_image_folder(source, storage_options)
            if class_names is not None and tuple(class_names) != listing.class_names:
                raise DataError(f"class folders {listing.class_names} differ from the classes given")
        if not listing.items:
            raise DataError(f"{listing.description}: no usable inputs ({len(listing.skipped)} skipped)")
        items = sorted(listing.items, key=lambda i: i.source)
        order = np.random.default_rng(options.seed).permutation(len(items))
        items = [items[i] for i in order]        # a global shuffle: the listing is in memory
        num_rows, names, label_type = len(items), listing.class_names, listing.label_type
        rows_of = lambda start, end: tuple(items[start:end])  # noqa: E731
        permute_seed, description, listing_skipped, pre_shuffled = None, listing.description, listing.skipped, True
    sizes = [min(part_rows, num_rows - start) for start in range(0, num_rows, part_rows)]
    summaries = {}
    with _executor(options):
        for i, (name, takes) in enumerate(_split_takes(sizes, val_fraction, split).items()):
            count = sum(hi - lo for lo, hi in takes)
            dataset = _with_widths(_Dataset(join_url(dest, name), label_type, len(names), options, None,
                                            storage_options), count)
            parts = _plan_parts(dataset, num_rows, rows_of, takes, part_rows, permute_seed)
            summaries[name] = _write_split(parts, name, names, description,
                                           listing_skipped if i == 0 else [], pre_shuffled=pre_shuffled)
    return WriteSummary(summaries)


def write_demo_shards(root: str, *, num_train: int = 2000, num_val: int = 500, image_size: int = 64,
                      samples_per_shard: int = 250, seed: int = 0, multi_label: bool = False,
                      num_workers: int = 1, progress: bool = False, executor: str = "local",
                      storage_options: dict[str, Any] | None = None) -> WriteSummary:
    """The generated demo dataset under ``root/train`` and ``root/val`` (see ``demo.py``).

    Deterministic: the same arguments write the same bytes. Splits whose index already records
    the same demo parameters are left alone (and interrupted runs resume shard by shard)."""
    demo = DemoSpec(image_size=image_size, seed=seed, multi_label=multi_label)
    # one shard per part: the demo is small, and the pool then writes shards in parallel
    options = ShardOptions(samples_per_shard=samples_per_shard, shards_per_part=1, executor=executor,  # type: ignore[arg-type]
                           num_workers=num_workers, progress=progress, seed=seed)
    label_type: LabelType = "multi" if multi_label else "single"
    summaries = {}
    with _executor(options):
        for split, first, count in (("train", 0, num_train), ("val", num_train, num_val)):
            if count > 0:
                summaries[split] = _write_demo_split(join_url(root, split), split, first, count, demo,
                                                     options, label_type, storage_options)
    return WriteSummary(summaries)


def _write_demo_split(split_url: str, split: str, first: int, count: int, demo: DemoSpec,
                      options: ShardOptions, label_type: LabelType,
                      storage_options: dict[str, Any] | None) -> SplitSummary:
    meta = {"demo": {**asdict(demo), "first_index": first, "num_samples": count}}
    index_url = ShardIndex.index_url(split_url, storage_options)
    if exists(index_url, storage_options):
        index = ShardIndex.load(split_url, storage_options)
        if index.meta.get("demo") == meta["demo"] and index.is_complete(storage_options):
            return SplitSummary(split, index_url, index.num_samples, index.num_shards,
                                index.shards.total_bytes, 0, index.num_shards, [])
    items = [InputItem(f"{_DEMO_PREFIX}{first + i}") for i in range(count)]
    dataset = _with_widths(_Dataset(split_url, label_type, len(DEMO_CLASSES), options, demo,
                                    storage_options), count)
    n = options.samples_per_shard
    parts = _plan_parts(dataset, count, lambda start, end: tuple(items[start:end]),
                        [(0, min(n, count - s)) for s in range(0, count, n)], n, None)
    return _write_split(parts, split, DEMO_CLASSES, "demo", [], meta)
