"""What shards are written from: an ImageFolder folder or a CSV manifest, listed whole
(``Listing``), and a Parquet manifest, streamed (``scan_manifest`` at plan time, ``ManifestRows``
read by each part task).

A manifest has an image column (a path relative to the manifest, or a URL) and ``label``
(single-label) or ``labels`` (multi-label: a list, a JSON list or a|b|c); labels are class names or
integer indices. A Parquet manifest may hold the images themselves: an image column of binary
type, or the struct ``{bytes, path}`` Hugging Face ``datasets`` writes (a row whose bytes are null
reads its path); class names then also come from the file's Hugging Face ``ClassLabel`` metadata.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from pipeline.data.index import LabelType
from pipeline.data.storage import DataError, is_url, open_file, parent_url, read_bytes, resolve_url, url_to_fs
from pipeline.redact import redact

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_COLUMNS = ("image", "path", "url", "filepath", "file", "filename", "image_path",
                  "img", "jpg", "jpeg", "png", "webp", "image_bytes")   # the last ones: embedded bytes


@dataclass(frozen=True)
class InputItem:
    source: str                   # path or URL of an image, "demo:<index>", or "<manifest>#row=<n>"
    labels: tuple[int, ...] = ()  # class indices; filled by the shard task for demo items
    data: bytes | None = field(default=None, repr=False, compare=False)   # embedded image bytes


@dataclass(frozen=True)
class SkippedInput:
    source: str
    reason: str


# ---------------------------------------------------------------------------------------------
# Listing sources
# ---------------------------------------------------------------------------------------------

@dataclass
class Listing:
    """A source listed whole (a folder, or a manifest read in memory): its usable inputs, the class
    names their labels index, and the inputs left out with the reason."""
    items: list[InputItem]
    class_names: tuple[str, ...]
    label_type: LabelType
    skipped: list[SkippedInput]
    description: str


def list_image_folder(root: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """ImageFolder layout: ``root/<class name>/<image>``; classes are the sorted folder names."""
    fs, base = url_to_fs(root, storage_options)
    if not fs.isdir(base):
        raise DataError(f"source folder {redact(root)} does not exist")
    base = base.rstrip("/")
    files = sorted(fs.find(base))
    class_names = sorted({p[len(base) + 1:].split("/", 1)[0] for p in files if "/" in p[len(base) + 1:]})
    if not class_names:
        raise DataError(f"source folder {redact(root)} has no class subfolders (expected "
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
            skipped.append(SkippedInput(redact(url), "not in a class folder"))
        elif not name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(SkippedInput(redact(url),
                                        f"not an image file ({os.path.splitext(name)[1] or 'no extension'})"))
        else:
            items.append(InputItem(url, (class_index[rel.split("/", 1)[0]],)))
    return Listing(items, tuple(class_names), "single", skipped, f"folder {redact(root)}")


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


def _manifest_columns(url: str, columns: Sequence[str]) -> tuple[str, str]:
    """The manifest's image column and its label column (``label``: single-label, ``labels``: multi-label)."""
    image_column = next((c for c in _IMAGE_COLUMNS if c in columns), None)
    label_column = "labels" if "labels" in columns else "label" if "label" in columns else None
    if image_column is None or label_column is None:
        raise DataError(f"manifest {redact(url)} needs an image column (one of "
                        f"{', '.join(_IMAGE_COLUMNS)}) and a 'label' or 'labels' column; "
                        f"it has {columns}")
    return image_column, label_column


def read_manifest(url: str, class_names: Sequence[str] | None = None,
                  storage_options: dict[str, Any] | None = None) -> Listing:
    """A CSV/Parquet manifest, read whole (``write_shards`` streams a Parquet one instead): an
    image column (path relative to the manifest, or URL) and
    ``label`` (single-label) or ``labels`` (multi-label: a list, JSON list or a|b|c).
    Labels are class names or integer indices; with no ``class_names`` given, integer labels mean
    classes ``0..max`` and names mean the sorted set of names seen."""
    try:
        rows = _read_manifest_rows(url, storage_options)
    except FileNotFoundError as exc:
        raise DataError(f"manifest {redact(url)} does not exist") from exc
    except (UnicodeDecodeError, csv.Error, OSError, ValueError) as exc:
        raise DataError(f"manifest {redact(url)} cannot be read: {exc}") from exc
    if not rows:
        raise DataError(f"manifest {redact(url)} has no rows")
    columns = list(rows[0].keys())
    image_column, label_column = _manifest_columns(url, columns)
    label_type: LabelType = "multi" if label_column == "labels" else "single"
    base = parent_url(url)
    tokens_per_row = [_split_label_tokens(row.get(label_column)) for row in rows]

    if class_names is None:
        class_names = class_names_from_tokens({t for tokens in tokens_per_row for t in tokens})
    class_index = {name: i for i, name in enumerate(class_names)}
    items, skipped = [], []
    for row_number, (row, tokens) in enumerate(zip(rows, tokens_per_row), start=2):
        parsed = _parse_row(row.get(image_column), tokens, base, class_index, label_type,
                            f"{redact(url)} row {row_number}")
        (items if isinstance(parsed, InputItem) else skipped).append(parsed)
    return Listing(items, tuple(class_names), label_type, skipped, f"manifest {redact(url)}")


# ---------------------------------------------------------------------------------------------
# Streaming a Parquet manifest
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestColumns:
    """What the driver learns from a Parquet manifest without reading its rows whole: the row
    count (from the footer), the columns, and the class names (one streamed pass over the label
    column when they are not given)."""
    url: str
    num_rows: int
    image_column: str
    label_column: str
    class_names: tuple[str, ...]
    embedded: bool = False        # the image column holds the images (binary, or {bytes, path})

    @property
    def label_type(self) -> LabelType:
        return "multi" if self.label_column == "labels" else "single"


def _parquet_file(f: IO[bytes]):
    import pyarrow.parquet as pq

    return pq.ParquetFile(f)


def scan_manifest(url: str, class_names: Sequence[str] | None = None,
                  storage_options: dict[str, Any] | None = None) -> ManifestColumns:
    """The plan-time facts of a Parquet manifest. Memory stays O(classes): with no ``class_names``
    the label column is streamed batch by batch and only its distinct values are kept."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        with open_file(url, "rb", storage_options) as f:
            pf = _parquet_file(f)
            columns = pf.schema_arrow.names
            num_rows = pf.metadata.num_rows
            image_column, label_column = _manifest_columns(url, columns)
            embedded = _is_embedded(pf.schema_arrow.field(image_column).type)
            if num_rows == 0:
                raise DataError(f"manifest {redact(url)} has no rows")
            if class_names is None:
                class_names = _hf_class_names(pf.schema_arrow.metadata, label_column)
            if class_names is None:
                seen: set[str] = set()
                for group in range(pf.metadata.num_row_groups):   # one at a time: a call over all
                    values = pf.read_row_group(group, columns=[label_column]).column(0)  # pre-buffers all
                    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                        values = pc.list_flatten(values)
                    for value in pc.unique(values).to_pylist():
                        seen.update(_split_label_tokens(value))
                class_names = class_names_from_tokens(seen)
    except FileNotFoundError as exc:
        raise DataError(f"manifest {redact(url)} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"manifest {redact(url)} cannot be read: {exc}") from exc
    return ManifestColumns(url, num_rows, image_column, label_column, tuple(class_names), embedded)


def _is_embedded(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _hf_class_names(metadata: dict[bytes, bytes] | None, label_column: str) -> list[str] | None:
    """The ``ClassLabel`` names Hugging Face ``datasets`` stores in a Parquet file's metadata."""
    try:
        features = json.loads((metadata or {})[b"huggingface"])["info"]["features"][label_column]
        if features.get("_type") == "Sequence":
            features = features["feature"]
        names = features["names"] if features.get("_type") == "ClassLabel" else None
        return [str(n) for n in names] if names else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def class_names_from_tokens(seen: set[str]) -> list[str]:
    if seen and all(t.lstrip("-").isdigit() for t in seen):
        return [str(i) for i in range(max(0, max(int(t) for t in seen)) + 1)]
    return sorted(t for t in seen if not t.lstrip("-").isdigit())


@dataclass(frozen=True)
class ManifestRows:
    """Rows ``[start, end)`` of a Parquet manifest: a part task reads them itself, so the manifest
    is never whole in any process. Row groups overlapping the range are decoded (two columns) up
    to ``end``; a part is a small fraction of a typical row group's cost to decode."""
    manifest: ManifestColumns
    start: int
    end: int
    storage_options: dict[str, Any] | None = None

    def read(self) -> list[InputItem | SkippedInput]:
        m = self.manifest
        with open_file(m.url, "rb", self.storage_options) as f:
            pf = _parquet_file(f)
            offsets = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                       for g in range(pf.metadata.num_row_groups)])
            groups = [g for g in range(pf.metadata.num_row_groups)
                      if offsets[g] < self.end and offsets[g + 1] > self.start]
            images: list[Any] = []
            labels: list[Any] = []
            position = int(offsets[groups[0]]) if groups else self.start
            for batch in pf.iter_batches(batch_size=max(1024, self.end - self.start), row_groups=groups,
                                         columns=[m.image_column, m.label_column]):
                lo, hi = max(self.start - position, 0), min(self.end - position, batch.num_rows)
                if hi > lo:
                    images += batch.column(0).slice(lo, hi - lo).to_pylist()
                    labels += batch.column(1).slice(lo, hi - lo).to_pylist()
                position += batch.num_rows
                if position >= self.end:
                    break
        class_index = {name: i for i, name in enumerate(m.class_names)}
        base = parent_url(m.url)
        if m.embedded:
            return [_embedded_row(image, _split_label_tokens(label), base, class_index, m.label_type,
                                  f"{redact(m.url)}#row={self.start + i}")
                    for i, (image, label) in enumerate(zip(images, labels))]
        return [_parse_row(image, _split_label_tokens(label), base, class_index, m.label_type,
                           f"{redact(m.url)} row {self.start + i}")
                for i, (image, label) in enumerate(zip(images, labels))]


def _embedded_row(image: Any, tokens: list[str], base: str, class_index: dict[str, int],
                  label_type: LabelType, where: str) -> InputItem | SkippedInput:
    """A row of a manifest holding its image: bytes (binary column) or {bytes, path} (Hugging Face);
    null bytes with a path: the path is read, as a path column's would be."""
    data, path = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
    if data is None:
        return _parse_row(path, tokens, base, class_index, label_type, where)
    labels = _parse_labels(tokens, class_index, label_type)
    return InputItem(where, labels, bytes(data)) if isinstance(labels, tuple) else SkippedInput(where, labels)


def _parse_row(image: Any, tokens: list[str], base: str, class_index: dict[str, int],
               label_type: LabelType, where: str) -> InputItem | SkippedInput:
    """One manifest row -> an input, or the reason it cannot be one."""
    if image is None or not str(image).strip():
        return SkippedInput(where, "missing image")
    source = resolve_url(base, str(image).strip())
    labels = _parse_labels(tokens, class_index, label_type)
    return InputItem(source, labels) if isinstance(labels, tuple) else SkippedInput(redact(source), labels)


def _parse_labels(tokens: list[str], class_index: dict[str, int], label_type: LabelType) -> tuple[int, ...] | str:
    """A row's class indices (sorted, distinct), or why it has none usable."""
    if not tokens:
        return "missing label"
    if label_type == "single" and len(tokens) > 1:
        return "several labels in a single-label manifest"
    labels: list[int] = []
    for token in tokens:
        if token in class_index:
            labels.append(class_index[token])
        elif token.lstrip("-").isdigit() and 0 <= int(token) < len(class_index):
            labels.append(int(token))
        else:
            return f"label out of range or unknown class: {token!r}"
    return tuple(sorted(set(labels)))
