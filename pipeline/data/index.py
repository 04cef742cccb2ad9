"""The shard index: the one file a reader needs (readers never list the bucket).

``ROOT/{split}/index.json`` lists the shards (URLs relative to the index), samples per shard,
sha256 and size per shard, class names and the label type. Shards with zero samples are left out.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.data.storage import (DataError, join_url, open_file, parent_url, read_bytes,
                                   redact_url, resolve_url)

INDEX_FILENAME = "index.json"
INDEX_FORMAT = "coatnet-shards/1"
LabelType = Literal["single", "multi"]


@dataclass(frozen=True)
class ShardInfo:
    url: str                     # relative to the index's folder, or absolute
    num_samples: int
    sha256: str | None = None    # of the whole tar file; None: not verified
    size_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "num_samples": self.num_samples, "sha256": self.sha256,
                "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class ShardIndex:
    root: str                                  # folder of the index (where relative URLs start)
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...]
    label_type: LabelType = "single"
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)   # image format, source, writer options

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_url(self, i: int) -> str:
        return resolve_url(self.root, self.shards[i].url)

    def fingerprint(self) -> str:
        """Identifies the shard list (URLs, counts, checksums): a loader state is only valid on it."""
        payload = json.dumps([s.to_json() for s in self.shards], sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "split": self.split,
            "label_type": self.label_type,
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "class_names": list(self.class_names),
            "shards": [s.to_json() for s in self.shards],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], root: str) -> ShardIndex:
        try:
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {INDEX_FORMAT!r}")
            shards = tuple(ShardInfo(url=str(s["url"]), num_samples=int(s["num_samples"]),
                                     sha256=s.get("sha256"), size_bytes=s.get("size_bytes"))
                           for s in data["shards"])
            label_type = data.get("label_type", "single")
            if label_type not in ("single", "multi"):
                raise ValueError(f"label_type {label_type!r} is neither 'single' nor 'multi'")
            index = cls(root=root, shards=shards, class_names=tuple(data["class_names"]),
                        label_type=label_type, split=str(data.get("split", "train")),
                        meta=dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed shard index under {redact_url(root)}: {exc!r}") from exc
        if "num_samples" in data and int(data["num_samples"]) != index.num_samples:
            raise DataError(f"shard index under {redact_url(root)} says {data['num_samples']} samples "
                            f"but its shards add up to {index.num_samples}")
        return index

    @staticmethod
    def index_url(url: str) -> str:
        return url if url.endswith(".json") else join_url(url, INDEX_FILENAME)

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None) -> ShardIndex:
        """Load ``url`` (a split folder such as ``s3://b/ds/train``, or the index.json itself)."""
        index_url = cls.index_url(url)
        try:
            data = json.loads(read_bytes(index_url, storage_options))
        except FileNotFoundError as exc:
            raise DataError(f"no shard index at {redact_url(index_url)}: write shards there first "
                            f"(python jobs/make_shards.py SOURCE DEST)") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"shard index {redact_url(index_url)} is not valid JSON: {exc}") from exc
        return cls.from_json(data, root=parent_url(index_url))

    def save(self, storage_options: dict[str, Any] | None = None) -> str:
        url = join_url(self.root, INDEX_FILENAME)
        with open_file(url, "wb", storage_options) as f:
            f.write(json.dumps(self.to_json(), indent=1).encode())
        return url
