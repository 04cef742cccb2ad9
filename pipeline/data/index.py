"""The shard index: the one file a reader needs (readers never list the bucket).

``ROOT/{split}/index.parquet`` (format ``coatnet-shards/2``) holds one row per shard in four
columns: ``url`` (relative to the index's folder, or absolute), ``num_samples``, ``size_bytes``
(-1: unknown) and ``sha256`` (32 raw bytes; all zero: not verified). The dataset-level fields
(format version, split, label type, class names, ``pre_shuffled``, sample and shard counts, the
fingerprint, free-form ``meta``; ``label_key`` for an index of existing shards, see
``pipeline.data.foreign``) are one JSON document in the Parquet schema metadata under the
key ``coatnet-shards``. Shards with zero samples are left out.

In memory the columns stay columns (an Arrow string array and numpy arrays, about 70 bytes per
shard: 10^6 shards take ~70 MB, not the ~600 MB of Python objects the JSON index needed), the
fingerprint is read from the file rather than recomputed, and loader workers never receive the
whole index: the loader hands each of them the few rows of its own shards (``ShardTable.take``).

The first format, ``index.json`` (``coatnet-shards/1``), is still read. The writer writes it next
to ``index.parquet`` for splits of at most ``JSON_COMPAT_MAX_SHARDS`` shards, where it costs
little, so that tools which only know ``index.json`` (older checkouts, ``jq``, a human) keep
working on the usual small evaluation splits.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.storage import DataError, exists, join_url, open_file, parent_url, read_bytes, resolve_url
from pipeline.redact import redact

INDEX_FILENAME = "index.parquet"
INDEX_FORMAT = "coatnet-shards/2"
JSON_INDEX_FILENAME = "index.json"
JSON_INDEX_FORMAT = "coatnet-shards/1"
JSON_COMPAT_MAX_SHARDS = 10_000
_METADATA_KEY = b"coatnet-shards"
_NO_SHA256 = bytes(32)
LabelType = Literal["single", "multi"]


@dataclass(frozen=True)
class ShardInfo:
    url: str                     # relative to the index's folder, or absolute
    num_samples: int
    sha256: str | None = None    # hex, of the whole tar file; None: not verified
    size_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "num_samples": self.num_samples, "sha256": self.sha256,
                "size_bytes": self.size_bytes}


class ShardTable(Sequence[ShardInfo]):
    """The shard rows of an index as numpy columns; ``table[i]`` builds one ``ShardInfo`` on
    demand. URLs are one UTF-8 byte array plus offsets (Arrow's string layout, held in numpy so
    that slicing and ``take`` need none of Arrow's compute kernels, ~30 MB to initialise)."""

    __slots__ = ("url_offsets", "url_bytes", "num_samples", "size_bytes", "sha256")

    def __init__(self, urls: Sequence[str] | pa.Array | tuple[np.ndarray, np.ndarray],
                 num_samples: np.ndarray, size_bytes: np.ndarray, sha256: np.ndarray) -> None:
        if isinstance(urls, tuple) and len(urls) == 2 and isinstance(urls[0], np.ndarray):
            offsets, data = urls
        else:
            offsets, data = _string_columns(urls if isinstance(urls, pa.Array) else pa.array(list(urls), pa.string()))
        self.url_offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.url_bytes = np.ascontiguousarray(data, dtype=np.uint8)
        self.num_samples = np.ascontiguousarray(num_samples, dtype=np.int64)
        self.size_bytes = np.ascontiguousarray(size_bytes, dtype=np.int64)
        self.sha256 = np.ascontiguousarray(sha256, dtype=np.uint8)
        n = len(self.url_offsets) - 1
        if not (len(self.num_samples) == len(self.size_bytes) == len(self.sha256) == n) \
                or self.sha256.shape[1:] != (32,):
            raise ValueError("shard columns differ in length, or sha256 is not [n, 32] bytes")

    @classmethod
    def from_infos(cls, shards: Sequence[ShardInfo]) -> ShardTable:
        sha = np.zeros((len(shards), 32), dtype=np.uint8)
        for i, s in enumerate(shards):
            if s.sha256:
                sha[i] = np.frombuffer(bytes.fromhex(s.sha256), dtype=np.uint8)
        return cls([s.url for s in shards],
                   np.array([s.num_samples for s in shards], dtype=np.int64),
                   np.array([-1 if s.size_bytes is None else s.size_bytes for s in shards], dtype=np.int64),
                   sha)

    def __len__(self) -> int:
        return len(self.url_offsets) - 1

    @overload
    def __getitem__(self, i: int) -> ShardInfo: ...
    @overload
    def __getitem__(self, i: slice) -> ShardTable: ...

    def __getitem__(self, i: int | slice) -> ShardInfo | ShardTable:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"shard {i} out of range ({len(self)} shards)")
        i %= len(self)
        size = int(self.size_bytes[i])
        return ShardInfo(self.url(i), int(self.num_samples[i]), self.sha256_hex(i),
                         None if size < 0 else size)

    def __iter__(self) -> Iterator[ShardInfo]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardTable):
            return NotImplemented
        return all(np.array_equal(getattr(self, a), getattr(other, a)) for a in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards, {int(self.num_samples.sum())} samples)"

    def url(self, i: int) -> str:
        return self.url_bytes[self.url_offsets[i]:self.url_offsets[i + 1]].tobytes().decode()

    def sha256_hex(self, i: int) -> str | None:
        digest = self.sha256[i].tobytes()
        return None if digest == _NO_SHA256 else digest.hex()

    def take(self, rows: np.ndarray) -> ShardTable:
        """The rows ``rows`` (a copy: a loader worker gets its own shards, not the whole index)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, stops = self.url_offsets[rows], self.url_offsets[rows + 1]
        lengths = stops - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return ShardTable((offsets, self.url_bytes[gather]), self.num_samples[rows],
                          self.size_bytes[rows], self.sha256[rows])

    @property
    def total_bytes(self) -> int:
        return int(self.size_bytes[self.size_bytes > 0].sum())

    def digest(self) -> str:
        """sha256 over the columns (URLs, counts, sizes, checksums): the index fingerprint."""
        h = hashlib.sha256(INDEX_FORMAT.encode() + b"\0")
        for column in (self.url_offsets - self.url_offsets[0], self.num_samples, self.size_bytes):
            h.update(column.astype("<i8").tobytes())
        h.update(self.url_bytes[self.url_offsets[0]:self.url_offsets[-1]].tobytes())
        h.update(self.sha256.tobytes())
        return h.hexdigest()[:16]

    def to_arrow(self) -> pa.Table:
        n = len(self)
        large = int(self.url_offsets[-1]) >= 2**31
        urls = pa.Array.from_buffers(pa.large_string() if large else pa.string(), n, [
            None, pa.py_buffer(self.url_offsets.astype(np.int64 if large else np.int32).tobytes()),
            pa.py_buffer(self.url_bytes.tobytes())])
        return pa.table({
            "url": urls,
            "num_samples": pa.array(self.num_samples),
            "size_bytes": pa.array(self.size_bytes),
            "sha256": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n,
                                                            [None, pa.py_buffer(self.sha256.tobytes())]),
        })

    @classmethod
    def from_arrow(cls, table: pa.Table) -> ShardTable:
        def column(name: str) -> pa.Array:
            chunks = table.column(name).chunks
            return chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)

        sha = column("sha256")
        if sha.type != pa.binary(32) or sha.null_count:
            raise ValueError(f"column sha256 is {sha.type} with {sha.null_count} nulls, "
                             f"expected non-null fixed_size_binary[32]")
        raw = np.frombuffer(sha.buffers()[1], dtype=np.uint8)
        raw = raw[sha.offset * 32:(sha.offset + len(sha)) * 32].reshape(-1, 32)
        offsets, url_bytes = _string_columns(column("url"))
        return cls((offsets, _file_backed(url_bytes)), column("num_samples").to_numpy(),
                   column("size_bytes").to_numpy(), _file_backed(raw))


def _file_backed(array: np.ndarray) -> np.ndarray:
    """``array`` moved to an unlinked temporary file and memory-mapped read-only: the columns a
    process only reads a few rows of (checksums, URL bytes) live in the page cache, shared with
    forked loader workers and evictable, instead of on the heap. Small arrays stay as they are."""
    if array.nbytes < 1 << 20:
        return array
    with tempfile.TemporaryFile(prefix="shard-index-") as f:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        f.flush()
        return np.memmap(f, dtype=array.dtype, mode="r", shape=array.shape)


def _string_columns(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets starting at 0, UTF-8 bytes) of an Arrow string array, without nulls."""
    if array.null_count:
        raise ValueError("a shard URL is null")
    if array.type not in (pa.string(), pa.large_string()):
        raise ValueError(f"shard URLs are {array.type}, expected strings")
    width = np.int64 if array.type == pa.large_string() else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=width)[array.offset:array.offset + len(array) + 1]
    data = array.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return (offsets - offsets[0]).astype(np.int64), raw[int(offsets[0]):int(offsets[-1])]


@dataclass(frozen=True, eq=False)
class ShardIndex:
    root: str                                  # folder of the index (where relative URLs start)
    shards: ShardTable                         # also accepts a sequence of ShardInfo
    class_names: tuple[str, ...]
    label_type: LabelType = "single"
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)   # image format, source, writer options
    pre_shuffled: bool = False                 # samples were shuffled across shards when written
    stored_fingerprint: str | None = None      # as read from the file; computed once otherwise
    label_key: str | None = None               # None: this pipeline's shards (cls / json labels);
                                               # else how an existing shard's labels are read
                                               # (reader.label_values: "cls", "txt", "json:FIELD")

    def __post_init__(self) -> None:
        if not isinstance(self.shards, ShardTable):
            object.__setattr__(self, "shards", ShardTable.from_infos(tuple(self.shards)))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.label_type not in ("single", "multi"):
            raise ValueError(f"label_type {self.label_type!r} is neither 'single' nor 'multi'")
        if (self.shards.num_samples < 0).any():
            raise ValueError("a shard has a negative sample count")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardIndex):
            return NotImplemented
        return (self.root == other.root and self.shards == other.shards
                and self.class_names == other.class_names and self.label_type == other.label_type
                and self.split == other.split and self.meta == other.meta
                and self.pre_shuffled == other.pre_shuffled and self.label_key == other.label_key)

    __hash__ = None  # type: ignore[assignment]

    @property
    def num_samples(self) -> int:
        return int(self.shards.num_samples.sum())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_url(self, i: int) -> str:
        return resolve_url(self.root, self.shards.url(i))

    def fingerprint(self) -> str:
        """Identifies the shard list (URLs, counts, sizes, checksums): a loader state is only
        valid on it. Stored in index.parquet; computed once per process for index.json."""
        if self.stored_fingerprint is None:
            object.__setattr__(self, "stored_fingerprint", self.shards.digest())
        return self.stored_fingerprint  # type: ignore[return-value]

    def legacy_fingerprint(self) -> str:
        """The fingerprint loader states written before index.parquet carry (slow: per shard)."""
        payload = json.dumps([s.to_json() for s in self.shards], sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def with_root(self, root: str) -> ShardIndex:
        return ShardIndex(root, self.shards, self.class_names, self.label_type, self.split,
                          self.meta, self.pre_shuffled, self.stored_fingerprint, self.label_key)

    # -- the JSON format (coatnet-shards/1) ------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": JSON_INDEX_FORMAT,
            "split": self.split,
            "label_type": self.label_type,
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "class_names": list(self.class_names),
            "pre_shuffled": self.pre_shuffled,
            "shards": [s.to_json() for s in self.shards],
            "meta": self.meta,
            **({"label_key": self.label_key} if self.label_key is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], root: str) -> ShardIndex:
        try:
            if data.get("format") != JSON_INDEX_FORMAT:
                raise _UnknownFormat(data.get("format"))
            shards = tuple(ShardInfo(url=str(s["url"]), num_samples=int(s["num_samples"]),
                                     sha256=s.get("sha256"), size_bytes=s.get("size_bytes"))
                           for s in data["shards"])
            index = cls(root=root, shards=shards, class_names=tuple(data["class_names"]),
                        label_type=data.get("label_type", "single"), split=str(data.get("split", "train")),
                        meta=dict(data.get("meta", {})), pre_shuffled=bool(data.get("pre_shuffled", False)),
                        label_key=data.get("label_key"))
        except _UnknownFormat as exc:
            raise DataError(_format_error(join_url(root, JSON_INDEX_FILENAME), exc.args[0])) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed shard index under {redact(root)}: {exc!r}") from exc
        if "num_samples" in data and int(data["num_samples"]) != index.num_samples:
            raise DataError(f"shard index under {redact(root)} says {data['num_samples']} samples "
                            f"but its shards add up to {index.num_samples}")
        return index

    # -- the Parquet format (coatnet-shards/2) ---------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "split": self.split, "label_type": self.label_type,
                "class_names": list(self.class_names), "pre_shuffled": self.pre_shuffled,
                "num_samples": self.num_samples, "num_shards": self.num_shards,
                "fingerprint": self.fingerprint(), "meta": self.meta,
                **({"label_key": self.label_key} if self.label_key is not None else {})}

    def to_parquet_bytes(self) -> bytes:
        table = self.shards.to_arrow()
        table = table.replace_schema_metadata({_METADATA_KEY: json.dumps(self.header()).encode()})
        buf = io.BytesIO()
        # sha256 does not compress; the URL column, dictionary-encoded or not, does (zstd).
        pq.write_table(table, buf, compression="zstd", use_dictionary=["url"],
                       row_group_size=1 << 20)
        return buf.getvalue()

    @classmethod
    def from_parquet(cls, f: IO[bytes], root: str, where: str) -> ShardIndex:
        try:
            # ParquetFile.read, not pq.read_table: that imports pyarrow.dataset (~50 MB). One
            # thread: the file is small and the decoding arenas of many threads cost more memory.
            # The system allocator: mimalloc (Arrow's default) keeps the decoding scratch, about as
            # much again as the columns, for the life of the process.
            pool = pa.default_memory_pool()
            pa.set_memory_pool(pa.system_memory_pool())
            try:
                table = pq.ParquetFile(f).read(use_threads=False)
            finally:
                pa.set_memory_pool(pool)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"shard index {redact(where)} is not a readable Parquet file: "
                            f"{str(exc).splitlines()[0]}") from None
        header_bytes = (table.schema.metadata or {}).get(_METADATA_KEY)
        try:
            header = json.loads(header_bytes) if header_bytes else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("format") != INDEX_FORMAT:
            raise DataError(_format_error(where, header.get("format")))
        try:
            shards = ShardTable.from_arrow(table)
            del table
            index = cls(root=root, shards=shards, class_names=tuple(header["class_names"]),
                        label_type=header.get("label_type", "single"), split=str(header.get("split", "train")),
                        meta=dict(header.get("meta", {})), pre_shuffled=bool(header.get("pre_shuffled", False)),
                        stored_fingerprint=header.get("fingerprint"), label_key=header.get("label_key"))
        except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
            raise DataError(f"malformed shard index {redact(where)}: {exc!r}") from None
        if int(header.get("num_samples", index.num_samples)) != index.num_samples:
            raise DataError(f"shard index {redact(where)} says {header['num_samples']} samples "
                            f"but its shards add up to {index.num_samples}")
        return index

    # -- storage ---------------------------------------------------------------------------------

    @staticmethod
    def index_url(url: str, storage_options: dict[str, Any] | None = None) -> str:
        """The index file of ``url``: itself when it names one, else the folder's index.parquet,
        or its index.json when only that exists."""
        if url.endswith((".json", ".parquet")):
            return url
        parquet = join_url(url, INDEX_FILENAME)
        if exists(parquet, storage_options) or not exists(join_url(url, JSON_INDEX_FILENAME), storage_options):
            return parquet
        return join_url(url, JSON_INDEX_FILENAME)

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None) -> ShardIndex:
        """Load ``url``: a split folder such as ``s3://b/ds/train`` (index.parquet, else
        index.json), or an index file itself."""
        index_url = cls.index_url(url, storage_options)
        root = parent_url(index_url)
        try:
            if index_url.endswith(".parquet"):
                with open_file(index_url, "rb", storage_options) as f:
                    return cls.from_parquet(f, root, index_url)
            data = read_bytes(index_url, storage_options)
        except FileNotFoundError:
            where = index_url if url.endswith((".json", ".parquet")) else \
                f"{join_url(url, INDEX_FILENAME)} (nor {JSON_INDEX_FILENAME})"
            raise DataError(f"no shard index at {redact(where)}: write shards there first "
                            f"(python jobs/make_shards.py SOURCE DEST)") from None
        try:
            parsed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"shard index {redact(index_url)} is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise DataError(f"malformed shard index under {redact(root)}: not a JSON object")
        return cls.from_json(parsed, root=root)

    def save(self, storage_options: dict[str, Any] | None = None, *,
             json_compat: bool | None = None) -> str:
        """Write index.parquet, and index.json after it for splits of at most
        ``JSON_COMPAT_MAX_SHARDS`` shards (``json_compat`` overrides). Returns the Parquet URL."""
        url = join_url(self.root, INDEX_FILENAME)
        with open_file(url, "wb", storage_options) as f:
            f.write(self.to_parquet_bytes())
        if json_compat if json_compat is not None else self.num_shards <= JSON_COMPAT_MAX_SHARDS:
            with open_file(join_url(self.root, JSON_INDEX_FILENAME), "wb", storage_options) as f:
                f.write(json.dumps(self.to_json(), indent=1).encode())
        return url

    def is_complete(self, storage_options: dict[str, Any] | None = None) -> bool:
        """Whether every index file ``save`` writes is there (index.json is written last)."""
        return self.num_shards > JSON_COMPAT_MAX_SHARDS or \
            exists(join_url(self.root, JSON_INDEX_FILENAME), storage_options)


class _UnknownFormat(Exception):
    pass


def _format_error(where: str, found: Any) -> str:
    return (f"shard index {redact(where)} has format {found!r}; this reader knows "
            f"{JSON_INDEX_FORMAT!r} (index.json) and {INDEX_FORMAT!r} (index.parquet): "
            f"rewrite the index with this version's writer, or read it with the version that wrote it")
