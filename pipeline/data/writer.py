"""Writing WebDataset shards (+ index) from an ImageFolder, a CSV/Parquet manifest or the demo set.

Layout written under DEST (a local path or any fsspec URL)::

    DEST/{split}/shard-000000.tar      {key}.jpg|png|webp + {key}.cls (single) | {key}.json (multi)
    DEST/{split}/_progress/shard-000000.json   per-shard record: makes reruns resumable
    DEST/{split}/index.parquet         written last (then index.json, for small splits); readers
                                       rely on it and never list the bucket

Inputs are listed, sorted, then permuted with ``seed`` (so every shard mixes classes), split
(``val_fraction``), and cut into shards of ``samples_per_shard`` inputs. A shard is one task for
a process pool; a rerun skips shards whose record matches the task and whose tar has the recorded
size. Sample keys are the 9-digit position of the input within its split.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from pipeline.data.demo import DEMO_CLASSES, demo_jpeg
from pipeline.data.index import LabelType, ShardIndex, ShardInfo
from pipeline.data.reader import pil_to_rgb8
from pipeline.data.storage import (DataError, RetryPolicy, call_with_retry, exists, is_url,
                                   join_url, open_file, parent_url, read_bytes, redact_url,
                                   resolve_url, url_to_fs)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}   # kept verbatim unless resized
_IMAGE_COLUMNS = ("image", "path", "url", "filepath", "file", "filename", "image_path")
_DEMO_PREFIX = "demo:"


@dataclass(frozen=True)
class InputItem:
    source: str                   # path or URL of an image, or "demo:<index>"
    labels: tuple[int, ...] = ()  # class indices; filled by the shard task for demo items


@dataclass(frozen=True)
class SkippedInput:
    source: str
    reason: str


@dataclass(frozen=True)
class ShardOptions:
    samples_per_shard: int = 1000
    max_side: int | None = None   # shrink so the longer side is at most this (re-encodes as JPEG)
    reencode: bool = False        # re-encode every image as JPEG even when no resize is needed
    quality: int = 90
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True
    seed: int = 0                 # input permutation and val split

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
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
                         f"{s.shards_reused} already complete) -> {redact_url(s.index_url)}")
        skipped = self.skipped
        lines.append(f"skipped inputs: {len(skipped)}")
        for reason, count in Counter(s.reason for s in skipped).most_common():
            names = [s.source for s in skipped if s.reason == reason][:examples]
            lines.append(f"  {count} x {reason}: {', '.join(names)}{' ...' if count > examples else ''}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Listing sources
# ---------------------------------------------------------------------------------------------

@dataclass
class _Listing:
    items: list[InputItem]
    class_names: tuple[str, ...]
    label_type: LabelType
    skipped: list[SkippedInput]
    description: str


def list_image_folder(root: str, storage_options: dict[str, Any] | None = None) -> _Listing:
    """ImageFolder layout: ``root/<class name>/<image>``; classes are the sorted folder names."""
    fs, base = url_to_fs(root, storage_options)
    if not fs.isdir(base):
        raise DataError(f"source folder {redact_url(root)} does not exist")
    base = base.rstrip("/")
    files = sorted(fs.find(base))
    class_names = sorted({p[len(base) + 1:].split("/", 1)[0] for p in files if "/" in p[len(base) + 1:]})
    if not class_names:
        raise DataError(f"source folder {redact_url(root)} has no class subfolders (expected "
                        f"ImageFolder layout: one subfolder of images per class)")
    class_index = {name: i for i, name in enumerate(class_names)}
    items, skipped = [], []
    for path in files:
        rel = path[len(base) + 1:]
        url = fs.unstrip_protocol(path) if is_url(root) else path
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        if "/" not in rel:
            skipped.append(SkippedInput(redact_url(url), "not in a class folder"))
        elif not name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(SkippedInput(redact_url(url), f"not an image file ({os.path.splitext(name)[1] or 'no extension'})"))
        else:
            items.append(InputItem(url, (class_index[rel.split("/", 1)[0]],)))
    return _Listing(items, tuple(class_names), "single", skipped, f"folder {redact_url(root)}")


def _split_label_tokens(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v).strip() for v in json.loads(text)]
        except json.JSONDecodeError:
            pass
    for sep in ("|", ";", ","):
        if sep in text:
            return [t.strip() for t in text.split(sep) if t.strip()]
    return [text] if text and text.lower() not in ("nan", "none") else []


def _read_manifest_rows(url: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    if url.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with open_file(url, "rb", storage_options) as f:
            return pq.read_table(f).to_pylist()
    text = read_bytes(url, storage_options).decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text)))


def read_manifest(url: str, class_names: Sequence[str] | None = None,
                  storage_options: dict[str, Any] | None = None) -> _Listing:
    """A CSV/Parquet manifest: an image column (path relative to the manifest, or URL) and
    ``label`` (single-label) or ``labels`` (multi-label: a list, JSON list or a|b|c).
    Labels are class names or integer indices; with no ``class_names`` given, integer labels mean
    classes ``0..max`` and names mean the sorted set of names seen."""
    try:
        rows = _read_manifest_rows(url, storage_options)
    except FileNotFoundError as exc:
        raise DataError(f"manifest {redact_url(url)} does not exist") from exc
    except (UnicodeDecodeError, csv.Error, OSError, ValueError) as exc:
        raise DataError(f"manifest {redact_url(url)} cannot be read: {exc}") from exc
    if not rows:
        raise DataError(f"manifest {redact_url(url)} has no rows")
    columns = list(rows[0].keys())
    image_column = next((c for c in _IMAGE_COLUMNS if c in columns), None)
    label_column = "labels" if "labels" in columns else "label" if "label" in columns else None
    if image_column is None or label_column is None:
        raise DataError(f"manifest {redact_url(url)} needs an image column (one of "
                        f"{', '.join(_IMAGE_COLUMNS)}) and a 'label' or 'labels' column; "
                        f"it has {columns}")
    label_type: LabelType = "multi" if label_column == "labels" else "single"
    base = parent_url(url)
    tokens_per_row = [_split_label_tokens(row.get(label_column)) for row in rows]

    if class_names is None:
        seen = {t for tokens in tokens_per_row for t in tokens}
        if seen and all(t.lstrip("-").isdigit() for t in seen):
            class_names = [str(i) for i in range(max(0, max(int(t) for t in seen)) + 1)]
        else:
            class_names = sorted(t for t in seen if not t.lstrip("-").isdigit())
    class_index = {name: i for i, name in enumerate(class_names)}

    items, skipped = [], []
    for row, tokens in zip(rows, tokens_per_row):
        image = row.get(image_column)
        if image is None or not str(image).strip():
            skipped.append(SkippedInput(f"{redact_url(url)} row {len(items) + len(skipped) + 2}", "missing image"))
            continue
        source = resolve_url(base, str(image).strip())
        if not tokens:
            skipped.append(SkippedInput(redact_url(source), "missing label"))
            continue
        if label_type == "single" and len(tokens) > 1:
            skipped.append(SkippedInput(redact_url(source), "several labels in a single-label manifest"))
            continue
        labels: list[int] = []
        for token in tokens:
            if token in class_index:
                labels.append(class_index[token])
            elif token.lstrip("-").isdigit() and 0 <= int(token) < len(class_names):
                labels.append(int(token))
            else:
                labels = []
                skipped.append(SkippedInput(redact_url(source), f"label out of range or unknown class: {token!r}"))
                break
        if labels:
            items.append(InputItem(source, tuple(sorted(set(labels)))))
    return _Listing(items, tuple(class_names), label_type, skipped, f"manifest {redact_url(url)}")


# ---------------------------------------------------------------------------------------------
# Writing one shard (runs in a pool process)
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
class _ShardTask:
    split_url: str
    shard: int
    first_key: int
    items: tuple[InputItem, ...]
    label_type: LabelType
    num_classes: int
    options: ShardOptions
    demo: DemoSpec | None
    storage_options: dict[str, Any] | None

    @property
    def tar_url(self) -> str:
        return join_url(self.split_url, f"shard-{self.shard:06d}.tar")

    @property
    def record_url(self) -> str:
        return join_url(self.split_url, "_progress", f"shard-{self.shard:06d}.json")

    def fingerprint(self) -> str:
        opts = asdict(self.options)
        for volatile in ("num_workers", "progress"):
            opts.pop(volatile)
        payload = json.dumps([self.first_key, [asdict(i) for i in self.items], self.label_type,
                              self.num_classes, opts, asdict(self.demo) if self.demo else None],
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


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


def _load_input(item: InputItem, task: _ShardTask) -> tuple[bytes, str, tuple[int, ...]]:
    if item.source.startswith(_DEMO_PREFIX):
        demo = task.demo or DemoSpec()
        data, labels = demo_jpeg(int(item.source[len(_DEMO_PREFIX):]), demo.image_size, demo.seed,
                                 demo.multi_label, task.options.quality)
    else:
        try:
            data = call_with_retry(lambda: read_bytes(item.source, task.storage_options), RetryPolicy())
        except FileNotFoundError as exc:
            raise _BadInput("file not found") from exc
        except OSError as exc:
            raise _BadInput(f"unreadable ({type(exc).__name__})") from exc
        labels = item.labels
    if any(not 0 <= label < task.num_classes for label in labels) or not labels:
        raise _BadInput("missing or out-of-range label")
    encoded, ext = _encode_image(data, task.options)
    return encoded, ext, labels


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0   # deterministic bytes: a rerun writes the same shard, same checksum
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(task: _ShardTask) -> dict[str, Any]:
    skipped: list[SkippedInput] = []
    num_samples = 0
    with open_file(task.tar_url, "wb", task.storage_options) as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
            for offset, item in enumerate(task.items):
                key = f"{task.first_key + offset:09d}"
                try:
                    data, ext, labels = _load_input(item, task)
                except _BadInput as exc:
                    skipped.append(SkippedInput(redact_url(item.source), str(exc)))
                    continue
                _add_member(tar, f"{key}.{ext}", data)
                if task.label_type == "single":
                    _add_member(tar, f"{key}.cls", str(labels[0]).encode())
                else:
                    _add_member(tar, f"{key}.json", json.dumps({"labels": list(labels)}).encode())
                num_samples += 1
    record = {"task": task.fingerprint(), "num_samples": num_samples,
              "sha256": out.sha256.hexdigest(), "size_bytes": out.size,
              "skipped": [asdict(s) for s in skipped]}
    with open_file(task.record_url, "wb", task.storage_options) as f:
        f.write(json.dumps(record).encode())
    return record


def _completed_record(task: _ShardTask) -> dict[str, Any] | None:
    """The record of an earlier run that wrote exactly this shard, if its tar is intact."""
    try:
        record = json.loads(read_bytes(task.record_url, task.storage_options))
        fs, path = url_to_fs(task.tar_url, task.storage_options)
        if record.get("task") == task.fingerprint() and fs.size(path) == record["size_bytes"]:
            return record
    except (OSError, json.JSONDecodeError, KeyError):   # absent or unreadable: write it again
        pass
    return None


def _shard_result(task: _ShardTask, result: Any) -> dict[str, Any]:
    """``result()``, with a failure to write the shard turned into a readable DataError."""
    try:
        return result()
    except Exception as exc:
        raise DataError(f"writing {redact_url(task.tar_url)} failed: {type(exc).__name__}: {exc} "
                        f"(a rerun resumes with the shards already complete)") from exc


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def _write_split(items: Sequence[InputItem], split_url: str, split: str, class_names: Sequence[str],
                 label_type: LabelType, options: ShardOptions, description: str,
                 listing_skipped: list[SkippedInput], demo: DemoSpec | None = None,
                 storage_options: dict[str, Any] | None = None,
                 extra_meta: dict[str, Any] | None = None) -> SplitSummary:
    n = options.samples_per_shard
    tasks = [_ShardTask(split_url, i, i * n, tuple(items[i * n:(i + 1) * n]), label_type,
                        len(class_names), options, demo, storage_options)
             for i in range(math.ceil(len(items) / n))]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        record = _completed_record(task)
        if record is None:
            todo.append(task)
        else:
            records[task.shard] = record
    reused = len(records)
    with tqdm(total=len(items), unit="img", desc=f"{split} shards", disable=not options.progress,
              initial=sum(len(t.items) for t in tasks if t.shard in records)) as bar:
        if options.num_workers > 1 and len(todo) > 1:
            with cf.ProcessPoolExecutor(max_workers=min(options.num_workers, len(todo))) as pool:
                futures = {pool.submit(_write_shard, task): task for task in todo}
                for future in cf.as_completed(futures):
                    task = futures[future]
                    records[task.shard] = _shard_result(task, future.result)
                    bar.update(len(task.items))
        else:
            for task in todo:
                records[task.shard] = _shard_result(task, lambda: _write_shard(task))
                bar.update(len(task.items))

    shards = [ShardInfo(url=f"shard-{i:06d}.tar", num_samples=records[i]["num_samples"],
                        sha256=records[i]["sha256"], size_bytes=records[i]["size_bytes"])
              for i in sorted(records) if records[i]["num_samples"] > 0]
    skipped = list(listing_skipped) + [SkippedInput(**s) for i in sorted(records)
                                       for s in records[i]["skipped"]]
    index = ShardIndex(root=split_url, shards=tuple(shards), class_names=tuple(class_names),
                       label_type=label_type, split=split, pre_shuffled=True,
                       meta={"source": description, "key_format": "9-digit position in split",
                             "samples_per_shard": n, "max_side": options.max_side,
                             "skipped_inputs": len(skipped), **(extra_meta or {})})
    if index.num_samples == 0:
        raise DataError(f"{description}: no usable samples for split {split!r} "
                        f"({len(skipped)} inputs skipped)")
    index_url = index.save(storage_options)
    return SplitSummary(split, index_url, index.num_samples, len(shards),
                        index.shards.total_bytes, len(todo), reused, skipped)


def write_shards(source: str, dest: str, *, split: str | None = None, val_fraction: float = 0.0,
                 options: ShardOptions | None = None, class_names: Sequence[str] | None = None,
                 storage_options: dict[str, Any] | None = None) -> WriteSummary:
    """Shard ``source`` (an ImageFolder folder or a .csv/.parquet manifest, local or fsspec URL)
    into ``dest``. With ``val_fraction`` > 0 the inputs are split into ``train`` and ``val``;
    otherwise everything goes to ``split`` (default ``train``)."""
    options = options or ShardOptions()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and split is not None:
        raise ValueError("give either val_fraction (train + val) or split, not both")
    if source.lower().endswith((".csv", ".parquet")):
        listing = read_manifest(source, class_names, storage_options)
    else:
        listing = list_image_folder(source, storage_options)
        if class_names is not None and tuple(class_names) != listing.class_names:
            raise DataError(f"class folders {listing.class_names} differ from the classes given")
    if not listing.items:
        raise DataError(f"{listing.description}: no usable inputs ({len(listing.skipped)} skipped)")
    items = sorted(listing.items, key=lambda i: i.source)
    order = np.random.default_rng(options.seed).permutation(len(items))
    items = [items[i] for i in order]
    if val_fraction > 0:
        num_val = max(1, round(val_fraction * len(items)))
        parts = {"train": items[num_val:], "val": items[:num_val]}
    else:
        parts = {split or "train": items}
    summaries = {}
    for i, (name, part) in enumerate(parts.items()):
        summaries[name] = _write_split(part, join_url(dest, name), name, listing.class_names,
                                       listing.label_type, options, listing.description,
                                       listing.skipped if i == 0 else [], None, storage_options)
    return WriteSummary(summaries)


def write_demo_shards(root: str, *, num_train: int = 2000, num_val: int = 500, image_size: int = 64,
                      samples_per_shard: int = 250, seed: int = 0, multi_label: bool = False,
                      num_workers: int = 1, progress: bool = False,
                      storage_options: dict[str, Any] | None = None) -> WriteSummary:
    """The generated demo dataset under ``root/train`` and ``root/val`` (see ``demo.py``).

    Deterministic: the same arguments write the same bytes. Splits whose index already records
    the same demo parameters are left alone (and interrupted runs resume shard by shard)."""
    demo = DemoSpec(image_size=image_size, seed=seed, multi_label=multi_label)
    options = ShardOptions(samples_per_shard=samples_per_shard, num_workers=num_workers,
                           progress=progress, seed=seed)
    label_type: LabelType = "multi" if multi_label else "single"
    summaries = {}
    for split, first, count in (("train", 0, num_train), ("val", num_train, num_val)):
        if count <= 0:
            continue
        split_url = join_url(root, split)
        meta = {"demo": {**asdict(demo), "first_index": first, "num_samples": count}}
        index_url = ShardIndex.index_url(split_url, storage_options)
        if exists(index_url, storage_options):
            index = ShardIndex.load(split_url, storage_options)
            if index.meta.get("demo") == meta["demo"] and index.is_complete(storage_options):
                summaries[split] = SplitSummary(split, index_url, index.num_samples, index.num_shards,
                                                index.shards.total_bytes, 0, index.num_shards, [])
                continue
        items = [InputItem(f"{_DEMO_PREFIX}{first + i}") for i in range(count)]
        summaries[split] = _write_split(items, split_url, split, DEMO_CLASSES, label_type, options,
                                        "demo", [], demo, storage_options, meta)
    return WriteSummary(summaries)
