"""The columnar shard index (index.parquet) at 10^4 shards, the legacy index.json, and the
vectorised epoch plan; no tar files needed."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError, ShardIndex, ShardInfo, ShardTable
from pipeline.data.plan import PlanConfig, plan_epoch


def synthetic(root: str, num_shards: int = 10_000) -> ShardIndex:
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 40, size=num_shards)
    table = ShardTable([f"shard-{i:06d}.tar" for i in range(num_shards)], counts, counts * 1000,
                       rng.integers(0, 256, size=(num_shards, 32), dtype=np.uint8))
    return ShardIndex(root=root, shards=table, class_names=("a", "b"), pre_shuffled=True,
                      meta={"source": "test"})


def test_parquet_index_round_trip_with_json_compat_and_a_stored_fingerprint(tmp_path):
    index = synthetic(str(tmp_path))
    assert index.save().endswith("index.parquet")
    loaded = ShardIndex.load(str(tmp_path))
    assert loaded == index and loaded.pre_shuffled and loaded.num_samples == index.num_samples
    assert loaded.stored_fingerprint == index.shards.digest() == loaded.fingerprint()
    legacy = ShardIndex.load(str(tmp_path / "index.json"))    # written too: <= 10^4 shards
    assert legacy == index and legacy.fingerprint() == loaded.fingerprint()
    assert loaded.shards[17] == ShardInfo("shard-000017.tar", int(index.shards.num_samples[17]),
                                          index.shards.sha256_hex(17), int(index.shards.size_bytes[17]))
    assert [s.url for s in loaded.shards[3:6]] == ["shard-000003.tar", "shard-000004.tar", "shard-000005.tar"]


def test_large_splits_get_no_json_and_the_parquet_file_wins(tmp_path):
    index = synthetic(str(tmp_path), 50)
    index.save(json_compat=False)
    assert not (tmp_path / "index.json").exists()
    (tmp_path / "index.json").write_text(json.dumps({**index.to_json(), "shards": []}))   # stale
    assert ShardIndex.load(str(tmp_path)) == index


def test_missing_and_unknown_index_versions_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no shard index at .*index.parquet") as err:
        ShardIndex.load(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)
    (tmp_path / "index.json").write_text('{"format": "coatnet-shards/9", "shards": []}')
    with pytest.raises(DataError, match="has format 'coatnet-shards/9'") as err:
        ShardIndex.load(str(tmp_path))
    assert "\n" not in str(err.value)
    table = synthetic(str(tmp_path), 3).shards.to_arrow()
    pq.write_table(table.replace_schema_metadata({b"coatnet-shards": b'{"format": "coatnet-shards/3"}'}),
                   tmp_path / "index.parquet")
    with pytest.raises(DataError, match="has format 'coatnet-shards/3'") as err:
        ShardIndex.load(str(tmp_path))
    assert "\n" not in str(err.value)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "index.parquet")
    with pytest.raises(DataError, match="has format None"):
        ShardIndex.load(str(tmp_path))


@pytest.mark.parametrize("world_size,workers", [(4, 3), (7, 1)])
def test_epoch_plan_over_10k_shards_covers_every_sample_once(tmp_path, world_size, workers):
    index = synthetic(str(tmp_path))
    seen, batches = [], set()
    for rank in range(world_size):
        cfg = PlanConfig(world_size=world_size, rank=rank, num_streams=workers, batch_size=32,
                         seed=0, shuffle=True, drop_last=False, samples_per_epoch=None)
        plans = plan_epoch(index, 2, cfg)
        batches.add(sum(len(p.batch_sizes) for p in plans))
        for plan in plans:
            assert plan.num_positions == sum(plan.batch_sizes)
            urls = np.array([plan.shards.url(int(r)) for r in plan.position_shard])
            seen += [f"{u}#{o}" for u, o in zip(urls, plan.position_offset)]
    assert len(batches) == 1                                  # equal steps on every rank
    expected = {f"{s.url}#{o}" for s in index.shards for o in range(s.num_samples)}
    assert len(seen) == len(expected) and set(seen) == expected
