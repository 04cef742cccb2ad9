"""Weighted mixing of sources: realised proportions, determinism, resume (also elastic), label spaces."""
from __future__ import annotations

import pytest

from pipeline.data import AugmentConfig, DataError, write_demo_shards
from pipeline.data.mixture import MixedLoader, Source, schedule


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    for name, seed, n in (("a", 0, 320), ("b", 1, 160)):
        write_demo_shards(str(root / name), num_train=n, num_val=16, image_size=32, samples_per_shard=40, seed=seed)
    return [Source("a", str(root / "a" / "train"), 0.7), Source("b", str(root / "b" / "train"), 0.3)]


def _loader(sources, rank=0, world=1, workers=0):
    return MixedLoader(sources, rank=rank, world_size=world, batch_size=8, img_size=32, train=True, seed=3,
                       num_workers=workers, augment=AugmentConfig.off(), output="uint8")


def test_schedule_proportions_within_one_batch_at_every_prefix():
    picks = schedule([0.7, 0.3], 1000)
    for n in (10, 37, 100, 999, 1000):
        assert abs(picks[:n].count(0) - 0.7 * n) < 1, n


def test_realised_proportions_and_resume(two_sources):
    # a "mixture epoch": 100 batches (800 samples; source b's 160 samples wrap into 5 epochs of it)
    loader = _loader(two_sources)
    full = []
    for batch in loader:
        full.append(list(batch.keys))
        if len(full) == 100:
            break
    share = loader.source_samples["a"] / sum(loader.source_samples.values())
    assert abs(share - 0.7) <= 0.01, loader.source_samples
    # stopped after 37 batches and resumed (state through JSON), the rest is the same stream
    first = _loader(two_sources)
    it = iter(first)
    for _ in range(37):
        next(it)
    import json

    state = json.loads(json.dumps(first.state_dict()))
    again = _loader(two_sources)
    again.load_state_dict(state)
    rest = []
    for batch in again:
        rest.append(list(batch.keys))
        if len(rest) == 63:
            break
    assert rest == full[37:]
    assert again.source_samples == loader.source_samples


def test_elastic_resume_keeps_every_sample_of_each_source_once(two_sources):
    """2 ranks for 10 mixture steps, then 1 rank from their state: over source a's epoch every
    sample of a is used exactly once, across the change of world size."""
    keys_a: list[str] = []
    ranks = [_loader(two_sources, rank=r, world=2) for r in (0, 1)]
    for loader in ranks:
        it = iter(loader)
        for _ in range(10):
            batch = next(it)
            if loader.last_source == "a":
                keys_a += batch.keys
    states = [loader.state_dict() for loader in ranks]
    assert states[0]["sources"] == states[1]["sources"]          # one global cursor per source
    one = _loader(two_sources)
    one.load_state_dict(states[0])
    for batch in one:
        if one.last_source == "a":
            keys_a += batch.keys
        if len(keys_a) >= 320:
            break
    assert len(keys_a) == 320 == len(set(keys_a))


def test_label_spaces_must_match(tmp_path, two_sources):
    write_demo_shards(str(tmp_path / "multi"), num_train=40, num_val=8, image_size=32, samples_per_shard=40,
                      multi_label=True)
    with pytest.raises(DataError, match="different label spaces"):
        _loader([two_sources[0], Source("m", str(tmp_path / "multi" / "train"), 0.5)])
    with pytest.raises(DataError, match="sum to more than 0"):
        _loader([Source("a", two_sources[0].index, 0.0)])
