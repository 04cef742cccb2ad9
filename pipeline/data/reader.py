"""Reading shards: one shard (webdataset's tar expansion and key grouping, checksum verified first),
a loader stream's shards in plan order (retried, verified, truncation and corruption counted per
sample), and the per-sample decode to 8-bit RGB.

The tar stream is parsed by ``webdataset.tariterators.tar_file_iterator`` (members) and
``group_by_keys`` (consecutive members sharing the name up to the first dot of the file name form
a sample; extensions lower-cased), exactly what ``wds.WebDataset`` does. We do not use
``wds.WebDataset`` itself: its shard assignment (``split_by_node`` / ``split_by_worker``) is by
whole shards, round-robin, which cannot give every rank the same number of batches from an
uneven shard list, and its error handlers drop a sample without telling us which one, so the
exact split, the skip accounting and the checksum stay ours, around webdataset's parsing.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.data.plan import StreamPlan, lane_cuts, lane_order
from pipeline.data.storage import DataError, open_file, resolve_url
from pipeline.redact import redact
from pipeline.retry import RetryPolicy, is_transient

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")   # in preference order
DEFAULT_MAX_PIXELS = 89_478_485      # PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
_SPOOL_IN_MEMORY = 64 << 20          # larger shards are spooled to a temporary file


class ShardSample(NamedTuple):
    key: str
    image: bytes                     # the encoded image (the first entry ``image_entry`` finds)
    files: dict[str, bytes]          # every entry of the sample by extension, image included


class ChecksumMismatch(Exception):
    def __init__(self, actual: str, expected: str) -> None:
        super().__init__(f"checksum mismatch: sha256 {actual} but the index says {expected}")
        self.actual = actual
        self.expected = expected


class CountingReader:
    """Read-through wrapper that hashes and counts what is read."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha256.update(data)
        self.bytes_read += len(data)
        return data

    def drain(self) -> int:
        while self.read(1 << 20):
            pass
        return self.bytes_read


def fetch_verified(f: IO[bytes], sha256: str, expected_size: int = -1,
                   max_in_memory: int = _SPOOL_IN_MEMORY) -> IO[bytes]:
    """The whole of ``f`` in a spooled temporary file (memory up to 64 MB, then local disk,
    deleted on close), after checking its sha256: no sample of a shard is used before its
    checksum is known to match. Raises ChecksumMismatch, except for a file shorter than
    ``expected_size`` (when known): that is a truncated copy, returned unverified so that the
    caller can use its complete samples and count the missing ones as truncated."""
    spool = tempfile.SpooledTemporaryFile(max_size=max_in_memory)
    try:
        digest = hashlib.sha256()
        size = 0
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            spool.write(chunk)
            size += len(chunk)
        if digest.hexdigest() != sha256 and not 0 <= size < expected_size:
            raise ChecksumMismatch(digest.hexdigest(), sha256)
        spool.seek(0)
        return spool  # type: ignore[return-value]
    except BaseException:
        spool.close()
        raise


def tar_samples(fileobj: IO[bytes], url: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar stream, parsed by webdataset. Tar errors
    (truncation, a duplicate entry) propagate; an unreadable header ends the iteration early, as
    in ``tarfile`` (the caller compares the bytes read with the expected size)."""
    members = ({**member, "__url__": url} for member in tar_file_iterator(fileobj))
    for sample in group_by_keys(members):
        key = sample.pop("__key__")
        sample.pop("__url__", None)
        yield key, sample


def image_entry(files: dict[str, bytes]) -> bytes | None:
    """The sample's encoded image: the first of ``IMAGE_EXTENSIONS`` it has, else any entry whose
    extension ends in one (``image.jpg``, as some writers name them); None without an image."""
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            return files[ext]
    return next((v for k, v in files.items() if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)


def label_values(files: dict[str, bytes], label_key: str) -> list[str] | None:
    """The raw label values of a sample under ``label_key``: ``EXT`` (the entry's text, e.g.
    ``cls`` or ``txt``: an integer or a class name) or ``EXT:FIELD`` (a field of a JSON entry,
    dots for nesting: an integer, a class name or a list of them). None when the sample has no
    such label (no entry, no field, a null); ValueError when the entry does not parse."""
    member, _, path = label_key.partition(":")
    if member not in files:
        return None
    if not path:
        text = files[member].decode().strip()
        return [text] if text else None
    value: Any = json.loads(files[member])
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in values if not isinstance(v, (dict, list))]


def has_label(files: dict[str, bytes], label_key: str) -> bool:
    try:
        return bool(label_values(files, label_key))
    except (ValueError, UnicodeDecodeError):
        return True      # present but unreadable: counted, then skipped when decoded


def usable_samples(samples: Iterator[tuple[str, dict[str, bytes]]], label_key: str | None
                   ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a shard that count, as the index counted them: with a ``label_key`` (an
    index of existing shards, ``pipeline.data.foreign``) only those with an image and that label;
    without (shards this pipeline wrote), every sample of the tar."""
    if label_key is None:
        yield from samples
        return
    for key, files in samples:
        if image_entry(files) is not None and has_label(files, label_key):
            yield key, files


def iter_shard_samples(url: str, *, storage_options: dict[str, Any] | None = None,
                       retry: RetryPolicy | None = None, sha256: str | None = None
                       ) -> Iterator[ShardSample]:
    """Every sample of the shard at ``url`` that has an image, in tar order: ``(key, image bytes,
    {extension: bytes})``. The one public way to read a shard outside the training loader
    (prediction, evaluation, tools). Opening is retried on transient storage errors; with
    ``sha256`` the shard is verified before the first sample is yielded (DataError otherwise)."""
    retry = retry or RetryPolicy()
    delays = retry.delays()
    while True:
        try:
            f = open_file(url, "rb", storage_options)
            break
        except Exception as exc:
            delay = next(delays, None) if is_transient(exc) else None
            if delay is None:
                raise
            time.sleep(delay)
    with f:
        source: IO[bytes] = f
        if sha256 is not None:
            try:
                source = fetch_verified(f, sha256)
            except ChecksumMismatch as exc:
                raise DataError(f"shard {redact(url)}: {exc}") from None
        with source:
            for key, files in tar_samples(source, redact(url)):
                image = image_entry(files)
                if image is not None:
                    yield ShardSample(key, image, files)


# ---------------------------------------------------------------------------------------------
# Reading a stream's shards (the loader's workers)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkippedSample:
    """A sample the loader left out (unreadable shard, bad tar, decode or transform failure)."""
    shard: str      # shard URL as written in the index (relative; never carries credentials)
    key: str        # sample key, or "#<index in shard>" when the tar ended before it
    reason: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {self.reason}"


@dataclass
class RawSample:
    """One sample as read from its shard: its entries by extension, not decoded yet."""
    shard: str
    key: str
    files: dict[str, bytes]


class StreamReader:
    """Reads a stream's shards in order; yields (position, RawSample | SkippedSample) for every
    position not in ``consumed``; consumed positions are never decoded and shards with no wanted
    position never opened. With ``lanes`` > 1 it reads that many shards at once (``plan.lane_order``:
    each lane in order, the lanes interleaved), and a verified shard is spooled in memory up to
    1/lanes of the 64 MB one shard may take, then to a temporary file."""

    def __init__(self, root: str, plan: StreamPlan, consumed: set[int], retry: RetryPolicy,
                 verify_checksums: bool, storage_options: dict[str, Any] | None,
                 label_key: str | None = None, lanes: int = 1) -> None:
        self.root = root
        self.label_key = label_key
        self.lanes = lanes
        self.plan = plan
        self.consumed = consumed
        self.retry = retry
        self.verify_checksums = verify_checksums
        self.storage_options = storage_options
        self.retries = 0

    def __iter__(self) -> Iterator[tuple[int, RawSample | SkippedSample]]:
        runs = self.plan.position_shard
        if self.lanes <= 1:
            yield from self._walk(0, len(runs))
            return
        cuts = lane_cuts(runs, self.lanes)
        walkers = [self._walk(a, b) for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist())]
        lane_of = np.repeat(np.arange(len(walkers)), np.diff(cuts))
        skip = set(self.consumed)
        for p in lane_order(runs, self.lanes).tolist():
            if p not in skip:
                position, item = next(walkers[lane_of[p]])
                if position != p:
                    raise RuntimeError(f"lane reader out of step: read {position}, expected {p}")
                yield position, item

    def _walk(self, lo: int, hi: int) -> Iterator[tuple[int, RawSample | SkippedSample]]:
        """Positions lo..hi-1 (whole shards), in order."""
        plan = self.plan
        bounds = lo + np.flatnonzero(np.diff(plan.position_shard[lo:hi], prepend=-1, append=-2))
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            wanted = {int(plan.position_offset[p]): p for p in range(a, b) if p not in self.consumed}
            self.consumed.difference_update(range(a, b))
            if wanted:
                yield from self._read_shard(int(plan.position_shard[a]), wanted)

    def _open(self, url: str, sha256: str | None, expected_size: int) -> IO[bytes]:
        share = _SPOOL_IN_MEMORY // max(1, self.lanes)      # one shard's memory, shared by the lanes
        f = open_file(url, "rb", self.storage_options, block_size=share if self.lanes > 1 else None)
        if sha256 is None or not self.verify_checksums:
            return f
        with f:
            return fetch_verified(f, sha256, expected_size, share)

    def _read_shard(self, row: int, wanted: dict[int, int]) -> Iterator[tuple[int, RawSample | SkippedSample]]:
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
                    samples = usable_samples(tar_samples(reader, redact(url)), self.label_key)
                    for i, (key, files) in enumerate(samples):
                        seen = i + 1
                        if i == todo[0]:
                            todo.pop(0)
                            yield wanted[i], RawSample(name, key, files)
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
# Decoding one sample
# ---------------------------------------------------------------------------------------------

class BadSample(Exception):
    pass


def parse_labels(files: dict[str, bytes], label_type: str, num_classes: int,
                 label_key: str | None = None, class_index: dict[str, int] | None = None) -> int | list[int]:
    """The label (single) or labels (multi) of a sample. ``label_key`` None: this pipeline's own
    shards (``cls`` holds the index; ``json`` holds ``{"labels": [...]}``); otherwise as the index
    of existing shards recorded it (``label_values``), class names mapped by ``class_index``."""
    if label_key is not None:
        return _parse_keyed(files, label_type, num_classes, label_key, class_index or {})
    labels: list[int]
    try:
        if label_type == "single":
            if "cls" not in files:
                raise BadSample("missing label")
            label: int | list[int] = int(files["cls"].decode().strip())
            labels = [label]  # type: ignore[list-item]
        else:
            if "json" not in files:
                raise BadSample("missing label")
            labels = [int(x) for x in json.loads(files["json"])["labels"]]
            label = labels
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BadSample(f"unparseable label ({exc})") from exc
    if not labels or any(not 0 <= x < num_classes for x in labels):
        raise BadSample(f"label out of range: {labels} (num_classes={num_classes})")
    return label


def _parse_keyed(files: dict[str, bytes], label_type: str, num_classes: int, label_key: str,
                 class_index: dict[str, int]) -> int | list[int]:
    try:
        values = label_values(files, label_key)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadSample(f"unparseable label ({exc})") from exc
    if not values:
        raise BadSample(f"missing label ({label_key})")
    labels = []
    for v in values:
        if v in class_index:
            labels.append(class_index[v])
        elif v.lstrip("-").isdigit() and 0 <= int(v) < num_classes:
            labels.append(int(v))
        else:
            raise BadSample(f"label out of range or unknown class: {v!r}")
    if label_type == "single":
        if len(labels) > 1:
            raise BadSample(f"several labels in a single-label split: {values}")
        return labels[0]
    return sorted(set(labels))


def pil_to_rgb8(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]: 16-bit and 32-bit greyscale scaled down (PIL's own
    convert would clip them to white), palette and alpha images flattened (alpha dropped, as
    torchvision's RGB mode does), CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def decode_rgb8(image_bytes: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """uint8 [3, H, W] from an encoded image of any common mode; BadSample if unusable."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as probe:   # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError as exc:    # PIL's own limit, 2 x Image.MAX_IMAGE_PIXELS
        raise BadSample(f"image too large ({exc})") from exc
    except Exception as exc:
        raise BadSample(f"corrupt image ({type(exc).__name__})") from exc
    if width * height > max_pixels:
        raise BadSample(f"image too large ({width}x{height} pixels > {max_pixels}: decompression bomb?)")
    try:
        image = decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
        if image.dtype != torch.uint8:     # 16-bit PNG
            image = (image.to(torch.float32) * (255.0 / torch.iinfo(image.dtype).max)).round().to(torch.uint8)
    except Exception:
        try:   # what torchvision's decoders refuse (e.g. some CMYK JPEGs, 16-bit greyscale), PIL converts
            with Image.open(io.BytesIO(image_bytes)) as pil:
                image = torch.from_numpy(pil_to_rgb8(pil).copy()).permute(2, 0, 1).contiguous()
        except Exception as exc:
            raise BadSample(f"corrupt image ({type(exc).__name__})") from exc
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise BadSample(f"image of unusable shape {tuple(image.shape)}")
    return image


def decode_sample(files: dict[str, bytes], label_type: str, num_classes: int,
                  max_pixels: int = DEFAULT_MAX_PIXELS, label_key: str | None = None,
                  class_index: dict[str, int] | None = None) -> tuple[torch.Tensor, int | list[int]]:
    """uint8 [3, H, W] image and the label(s) of one raw sample; BadSample if unusable."""
    image_bytes = image_entry(files)
    if image_bytes is None:
        raise BadSample("no image entry")
    label = parse_labels(files, label_type, num_classes, label_key, class_index)
    return decode_rgb8(image_bytes, max_pixels), label
