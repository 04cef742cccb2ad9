"""Streaming data pipeline: WebDataset shards + index on any fsspec storage, exact rank/worker
split, torchvision v2 transforms, elastic resumable position. The contract is in docs/DESIGN.md."""
from pipeline.data.demo import DEMO_CLASSES, demo_sample
from pipeline.data.foreign import IndexOptions, IndexSummary, index_existing_shards
from pipeline.data.index import ShardIndex, ShardInfo, ShardTable
from pipeline.data.loader import Batch, LoaderStats, StreamingLoader
from pipeline.data.reader import ShardSample, SkippedSample, iter_shard_samples
from pipeline.data.sources import (InputItem, Listing, ManifestColumns, SkippedInput, list_image_folder, read_manifest,
                                   scan_manifest)
from pipeline.data.storage import DataError, register_webdataset_handlers
from pipeline.data.transforms import AugmentConfig, DeviceBatchTransform
from pipeline.data.writer import ShardOptions, WriteSummary, write_demo_shards, write_shards
from pipeline.retry import RetryPolicy

__all__ = [
    "AugmentConfig", "Batch", "DEMO_CLASSES", "DataError", "DeviceBatchTransform", "IndexOptions", "IndexSummary",
    "InputItem", "Listing",
    "LoaderStats", "ManifestColumns", "RetryPolicy", "ShardIndex", "ShardInfo", "ShardOptions", "ShardSample",
    "ShardTable", "SkippedInput", "SkippedSample", "StreamingLoader", "WriteSummary",
    "demo_sample", "index_existing_shards", "iter_shard_samples", "list_image_folder", "read_manifest", "register_webdataset_handlers",
    "scan_manifest", "write_demo_shards", "write_shards",
]
