"""Indexing existing WebDataset shards in place (``jobs/index_shards.py``): shards written by
``webdataset.ShardWriter``, img2dataset or anyone else become a split the loader trains on, without
rewriting them.

Each shard is read once, streamed: its sha256 and size are taken while webdataset's tar parsing
counts its samples (``reader.usable_samples``: an image entry and the label, exactly as the loader
will count them) and collects the label values it finds under the label key. Shards are indexed in
groups (one task each: a process of a local pool, or a Ray task with ``executor="ray"``); a group's
result is recorded under ``DEST/SPLIT/_progress/index-<id>.json`` by the task that made it, so a
re-run reads the record instead of the shards. The driver keeps one row per shard and the set of
label values, never a shard's samples. The index (``DEST/SPLIT/index.parquet``, the one format of
``pipeline.data.index``) points at the shards where they are - relative URLs when they lie under
``DEST/SPLIT``, absolute otherwise - and records ``label_key``; the shards are never modified.

A shard that cannot be read (missing, corrupt tar) and samples without an image or a label are
left out and counted in the summary, never fatal. A bad input is: SHARDS matching nothing, a label
key no sample has, a label that is not among the given class names (``DataError``, one line).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from pipeline.data.index import LabelType, ShardIndex, ShardTable
from pipeline.data.reader import CountingReader, image_entry, label_values, tar_samples, usable_samples
from pipeline.data.sources import class_names_from_tokens
from pipeline.data.storage import DataError, exists, is_url, join_url, open_file, read_bytes, url_to_fs
from pipeline.redact import redact
from pipeline.retry import RetryPolicy, call_with_retry

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
_RECORD_VERSION = 1


@dataclass(frozen=True)
class IndexOptions:
    label_key: str = "cls"                 # an entry (cls, txt, label...) or json:FIELD
    class_names: tuple[str, ...] | None = None   # None: discovered, sorted as the writer does
    executor: Literal["local", "ray"] = "local"
    num_workers: int = 1                   # local processes (with ray and no cluster: its CPUs)
    shards_per_task: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        if self.shards_per_task < 1:
            raise ValueError(f"shards_per_task must be >= 1, got {self.shards_per_task}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if not self.label_key or self.label_key.startswith(":") or self.label_key.endswith(":"):
            raise ValueError(f"label key {self.label_key!r}: give an entry (cls, txt) or json:FIELD")


@dataclass
class IndexSummary:
    index_url: str
    num_shards: int
    num_samples: int
    num_classes: int
    label_type: LabelType
    shards_indexed: int                    # read now
    shards_reused: int                     # from an earlier run's records
    failed: list[tuple[str, str]]          # (shard, reason): left out
    no_image: int                          # samples without an image entry: left out
    no_label: int                          # samples with an image but no label: left out
    bytes_read: int = 0

    def format(self) -> str:
        lines = [f"{self.num_samples} samples in {self.num_shards} shards, {self.num_classes} "
                 f"{self.label_type}-label classes ({self.shards_indexed} shards read, "
                 f"{self.shards_reused} already indexed) -> {redact(self.index_url)}",
                 f"left out: {len(self.failed)} unreadable shards, {self.no_image} samples without "
                 f"an image, {self.no_label} without a label"]
        for reason, count in Counter(r for _, r in self.failed).most_common(5):
            names = [s for s, r in self.failed if r == reason][:3]
            lines.append(f"  {count} x {reason}: {', '.join(redact(n) for n in names)}"
                         f"{' ...' if count > 3 else ''}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Which shards
# ---------------------------------------------------------------------------------------------

def _absolute(url: str) -> str:
    return url if is_url(url) else os.path.abspath(url)


def list_shard_urls(spec: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The shards ``spec`` names: a WebDataset brace pattern (``s3://b/train-{000000..000999}.tar``),
    a glob, one shard, a text file of shard URLs (one a line; ``#`` comments), or a folder/prefix
    (every .tar/.tgz under it, sorted). DataError when it names none."""
    from braceexpand import braceexpand

    if "{" in spec and "}" in spec:
        urls = [_absolute(u) for u in braceexpand(spec)]
        if not exists(urls[0], storage_options):
            raise DataError(f"shard pattern {redact(spec)} matches nothing: no shard at {redact(urls[0])}")
        return urls
    fs, path = url_to_fs(spec, storage_options)
    if any(c in spec for c in "*?["):
        found = sorted(p for p in fs.glob(path) if p.endswith(SHARD_SUFFIXES))
        if not found:
            raise DataError(f"shard pattern {redact(spec)} matches nothing")
        return [fs.unstrip_protocol(p) if is_url(spec) else p for p in found]
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.endswith(SHARD_SUFFIXES) and "/_progress/" not in p)
        if not found:
            raise DataError(f"no shards (.tar, .tgz) under {redact(spec)}")
        return [fs.unstrip_protocol(p) if is_url(spec) else os.path.abspath(p) for p in found]
    if not fs.exists(path):
        raise DataError(f"shards {redact(spec)}: no such file, folder or prefix")
    if spec.endswith(SHARD_SUFFIXES):
        return [_absolute(spec)]
    base = spec.rsplit("/", 1)[0] if "/" in spec else "."
    urls = []
    for line in read_bytes(spec, storage_options).decode().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            urls.append(line if is_url(line) or line.startswith("/") else _absolute(join_url(base, line)))
    if not urls:
        raise DataError(f"shard list {redact(spec)} names no shard")
    return urls


# ---------------------------------------------------------------------------------------------
# Reading shards (runs in the tasks)
# ---------------------------------------------------------------------------------------------

def index_shard(url: str, label_key: str, storage_options: dict[str, Any] | None = None,
                retry: RetryPolicy | None = None) -> dict[str, Any]:
    """One shard read once: {num_samples, size_bytes, sha256, values (label values seen), multi
    (a list value seen), entries (extensions seen), no_image, no_label}, or {error}."""
    values: set[str] = set()
    entries: set[str] = set()
    counts = {"all": 0, "no_image": 0}
    multi = False

    def seen(samples: Iterator[tuple[str, dict[str, bytes]]]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for key, files in samples:
            counts["all"] += 1
            entries.update(files)
            counts["no_image"] += image_entry(files) is None
            yield key, files

    try:
        f = call_with_retry(lambda: open_file(url, "rb", storage_options), retry or RetryPolicy(timeout_s=60))
    except FileNotFoundError:
        return {"error": "missing"}
    except Exception as exc:
        return {"error": f"cannot open ({type(exc).__name__})"}
    usable = 0
    try:
        with f:
            reader = _TailReader(f)
            for _, files in usable_samples(seen(tar_samples(reader, redact(url))), label_key):
                usable += 1
                try:
                    values.update(label_values(files, label_key) or ())
                    multi = multi or _is_list(files, label_key)
                except (ValueError, UnicodeDecodeError):
                    pass          # counted now; skipped (and reported) when the loader decodes it
            stopped_at = reader.bytes_read
            trailing = reader.drain_nonzero()
            size = reader.bytes_read
    except (tarfile.TarError, EOFError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"error": f"corrupt or truncated tar ({first})"}
    if not reader.gzipped and (trailing or reader.tail != bytes(len(reader.tail))):
        # tarfile ends quietly at a bad header: a good tar ends with zero blocks and nothing else
        return {"error": f"corrupt or truncated tar (stops after sample {counts['all']}, "
                         f"{stopped_at} of {size} bytes)"}
    return {"num_samples": usable, "size_bytes": size, "sha256": reader.sha256.hexdigest(),
            "values": sorted(values), "multi": multi, "entries": sorted(entries),
            "no_image": counts["no_image"], "no_label": counts["all"] - counts["no_image"] - usable}


class _TailReader(CountingReader):
    """Counts and hashes what is read, and keeps the last 1 KB: a tar's end-of-archive marker."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.tail = b""
        self.gzipped: bool | None = None

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if self.gzipped is None and data:
            self.gzipped = data[:2] == b"\x1f\x8b"
        self.tail = (self.tail + data)[-1024:]
        return data

    def drain_nonzero(self) -> bool:
        """Read the rest; whether any of it is not zero padding."""
        found = False
        while chunk := self.read(1 << 20):
            found = found or chunk.count(0) != len(chunk)
        return found


def _is_list(files: dict[str, bytes], label_key: str) -> bool:
    member, _, path = label_key.partition(":")
    if not path:
        return False
    value: Any = json.loads(files[member])
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return isinstance(value, list)


@dataclass(frozen=True)
class _Group:
    urls: tuple[str, ...]
    label_key: str
    record_url: str
    storage_options: dict[str, Any] | None = None


def group_id(urls: Sequence[str], label_key: str) -> str:
    h = hashlib.sha256(f"{_RECORD_VERSION}\0{label_key}\0".encode())
    for u in urls:
        h.update(u.encode() + b"\0")
    return h.hexdigest()[:20]


def index_group(group: _Group) -> tuple[list[dict[str, Any]], bool]:
    """The records of a group of shards, and whether they came from an earlier run's record file.
    The record is written by the task itself, after every shard of the group was read."""
    try:
        record = json.loads(read_bytes(group.record_url, group.storage_options))
        if record.get("urls") == list(group.urls) and record.get("label_key") == group.label_key:
            return record["shards"], True
    except (OSError, ValueError, KeyError):
        pass
    shards = [index_shard(u, group.label_key, group.storage_options) for u in group.urls]
    with open_file(group.record_url, "wb", group.storage_options) as f:
        f.write(json.dumps({"urls": list(group.urls), "label_key": group.label_key,
                            "shards": shards}).encode())
    return shards, False


def _run_groups(groups: Sequence[_Group], options: IndexOptions, bar: tqdm
                ) -> Iterator[tuple[_Group, list[dict[str, Any]], bool]]:
    if options.executor == "ray":
        yield from _run_groups_on_ray(groups, bar)
        return
    if options.num_workers > 1 and len(groups) > 1:
        with cf.ProcessPoolExecutor(max_workers=min(options.num_workers, len(groups))) as pool:
            futures = {pool.submit(index_group, g): g for g in groups}
            for future in cf.as_completed(futures):
                g = futures[future]
                yield g, *future.result()
                bar.update(len(g.urls))
        return
    for g in groups:
        yield g, *index_group(g)
        bar.update(len(g.urls))


def _run_groups_on_ray(groups: Sequence[_Group], bar: tqdm
                       ) -> Iterator[tuple[_Group, list[dict[str, Any]], bool]]:
    """One Ray task per group, at most two per cluster CPU in flight; a lost task is retried."""
    import ray

    from pipeline.cluster import worker_env

    task = ray.remote(num_cpus=1, max_retries=3)(index_group).options(runtime_env={"env_vars": worker_env()})
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    todo = iter(groups)
    pending: dict[Any, _Group] = {}
    while True:
        while len(pending) < window and (g := next(todo, None)) is not None:
            pending[task.remote(g)] = g
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        g = pending.pop(done[0])
        yield g, *ray.get(done[0])
        bar.update(len(g.urls))


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------

@dataclass
class _Collected:
    urls: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    values: set[str] = field(default_factory=set)
    entries: set[str] = field(default_factory=set)
    multi: bool = False
    failed: list[tuple[str, str]] = field(default_factory=list)
    no_image: int = 0
    no_label: int = 0
    indexed: int = 0
    reused: int = 0
    bytes_read: int = 0

    def add(self, group: _Group, records: list[dict[str, Any]], reused: bool) -> None:
        for url, r in zip(group.urls, records):
            if "error" in r:
                self.failed.append((url, r["error"]))
                continue
            self.entries.update(r["entries"])
            self.no_image += r["no_image"]
            self.no_label += r["no_label"]
            self.values.update(r["values"])
            self.multi = self.multi or r["multi"]
            if r["num_samples"] > 0:
                self.urls.append(url)
                self.counts.append(r["num_samples"])
                self.sizes.append(r["size_bytes"])
                self.digests.append(bytes.fromhex(r["sha256"]))
            if not reused:
                self.bytes_read += r["size_bytes"]
        if reused:
            self.reused += len(group.urls)
        else:
            self.indexed += len(group.urls)


def _class_names(values: set[str], given: tuple[str, ...] | None, label_key: str) -> tuple[str, ...]:
    if given is None:
        names = class_names_from_tokens(values)
        unmapped = sorted(v for v in values if v not in names and not v.lstrip("-").isdigit())
        if unmapped:
            raise DataError(f"label key {label_key}: no class names for {unmapped[:5]}")
        return tuple(names)
    index = set(given)
    for v in sorted(values):
        if v not in index and not (v.lstrip("-").isdigit() and 0 <= int(v) < len(given)):
            raise DataError(f"label {v!r} (label key {label_key}) is not a class name of the classes "
                            f"given ({len(given)} names) nor an index into them")
    return given


def _relative(url: str, split_url: str) -> str:
    prefix = split_url.rstrip("/") + "/"
    return url[len(prefix):] if url.startswith(prefix) else url


def index_existing_shards(shards: str, dest: str, split: str = "train", options: IndexOptions | None = None,
                          storage_options: dict[str, Any] | None = None) -> IndexSummary:
    """Index the existing shards ``shards`` names (see ``list_shard_urls``) as split ``split`` of
    the dataset root ``dest``: writes ``dest/split/index.parquet`` (and index.json for small
    splits), reading every shard once (re-runs read only shards without a record)."""
    options = options or IndexOptions()
    urls = list_shard_urls(shards, storage_options)
    split_url = _absolute(join_url(dest, split))
    n = options.shards_per_task
    groups = [_Group(tuple(urls[i:i + n]), options.label_key,
                     join_url(split_url, "_progress", f"index-{group_id(urls[i:i + n], options.label_key)}.json"),
                     storage_options)
              for i in range(0, len(urls), n)]
    got = _Collected()
    with _executor(options), tqdm(total=len(urls), unit="shard", desc=f"indexing {split}",
                                  disable=not options.progress) as bar:
        for group, records, reused in _run_groups(groups, options, bar):
            got.add(group, records, reused)
    if not got.urls and got.failed and len(got.failed) == len(urls):
        raise DataError(f"none of the {len(urls)} shards of {redact(shards)} could be read "
                        f"(first: {redact(got.failed[0][0])}: {got.failed[0][1]})")
    if not got.urls:
        member = options.label_key.partition(":")[0]
        raise DataError(f"label key {options.label_key}: no sample of {redact(shards)} has it "
                        f"(entries found: {', '.join(sorted(got.entries)) or 'none'}"
                        f"{'' if member in got.entries else f'; none named {member}'})")
    class_names = _class_names(got.values, options.class_names, options.label_key)
    position = {u: i for i, u in enumerate(urls)}          # listing order, not the order tasks finished
    order = np.array(sorted(range(len(got.urls)), key=lambda i: position[got.urls[i]]), dtype=np.int64)
    table = ShardTable([_relative(got.urls[i], split_url) for i in order],
                       np.array(got.counts, dtype=np.int64)[order], np.array(got.sizes, dtype=np.int64)[order],
                       np.frombuffer(b"".join(got.digests), dtype=np.uint8).reshape(-1, 32)[order])
    index = ShardIndex(root=split_url, shards=table, class_names=class_names,
                       label_type="multi" if got.multi else "single", split=split, pre_shuffled=False,
                       label_key=options.label_key,
                       meta={"source": f"existing shards {redact(shards)}", "indexed_by": "index_shards",
                             "left_out": {"shards": len(got.failed), "no_image": got.no_image,
                                          "no_label": got.no_label}})
    index_url = index.save(storage_options)
    return IndexSummary(index_url, index.num_shards, index.num_samples, index.num_classes, index.label_type,
                        got.indexed, got.reused, got.failed, got.no_image, got.no_label, got.bytes_read)


class _executor:
    def __init__(self, options: IndexOptions) -> None:
        self.options = options
        self._cm: Any = None

    def __enter__(self) -> None:
        if self.options.executor == "ray":
            from pipeline.cluster import ray_session

            self._cm = ray_session(num_cpus=self.options.num_workers)
            self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
