"""Elastic exact cursor: a mid-epoch state resumes at another world size and worker count with
every remaining sample read exactly once and equal batch counts on every rank."""
from __future__ import annotations

import json

import pytest

from pipeline.data import AugmentConfig, ShardIndex, StreamingLoader, write_demo_shards

NO_AUG = AugmentConfig.off()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> ShardIndex:
    """101 samples in shards of 23, 23, 23, 23, 9."""
    root = str(tmp_path_factory.mktemp("elastic"))
    write_demo_shards(root, num_train=101, num_val=0, image_size=16, samples_per_shard=23)
    return ShardIndex.load(f"{root}/train")


def _loaders(index, world_size, num_workers, **kw):
    return [StreamingLoader(index, rank=r, world_size=world_size, batch_size=4, img_size=16,
                            num_workers=num_workers, augment=NO_AUG, shuffle_buffer=10, **kw)
            for r in range(world_size)]


def run(index, world_size, num_workers, state=None, stop_after=None):
    """Every rank of a world for ``stop_after`` batches (or to the epoch's end): (keys, batch
    counts per rank, the state the ranks agree on)."""
    keys, counts, states = [], [], []
    for loader in _loaders(index, world_size, num_workers):
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
            loader.set_epoch(0)
        got = 0
        for batch in loader:
            keys += batch.keys
            got += 1
            if got == stop_after:
                break
        counts.append(got)
        states.append(loader.state_dict())
    assert all(s == states[0] for s in states)           # every rank saves the same cursor
    return keys, counts, states[0]


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (3, 2), (2, 2)])
def test_resume_at_another_world_size_and_worker_count(uneven, world_size, num_workers):
    head, counts, state = run(uneven, 2, 2, stop_after=5)
    assert counts == [5, 5] and state["batches_consumed"] == 5
    tail, counts, end = run(uneven, world_size, num_workers, state=state)
    assert len(set(counts)) == 1 and counts[0] > 0           # equal steps on every rank
    assert sorted(head + tail) == [f"{i:09d}" for i in range(101)]
    assert end["epoch"] == 1 and end["batches_consumed"] == 0


def test_chained_elastic_resumes_and_batches_remaining(uneven):
    head, _, state = run(uneven, 2, 2, stop_after=3)
    resumed = _loaders(uneven, 3, 2)[0]
    resumed.load_state_dict(state)
    assert resumed.batches_remaining == 7          # 101 - 2 ranks x 3 x 4 = 77: ceil(ceil(77 / 3) / 4)
    middle, counts, state = run(uneven, 3, 2, state=state, stop_after=2)
    assert counts == [2, 2, 2] and len(state["generations"]) == 2
    tail, counts, _ = run(uneven, 1, 0, state=state)
    keys = head + middle + tail
    assert sorted(keys) == [f"{i:09d}" for i in range(101)] and len(set(keys)) == 101


def test_same_plan_resume_keeps_the_uninterrupted_batches(uneven):
    reference, _, _ = run(uneven, 2, 2)
    head, _, state = run(uneven, 2, 2, stop_after=4)
    tail, _, _ = run(uneven, 2, 2, state=state)
    assert sorted(head + tail) == sorted(reference)


def test_resampled_epochs_refuse_a_world_size_change(uneven):
    loader = _loaders(uneven, 2, 0, samples_per_epoch=64)[0]
    next(iter(loader))
    other = _loaders(uneven, 1, 0, samples_per_epoch=64)[0]
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(loader.state_dict())


def test_drop_last_elastic_resume_reads_no_sample_twice(uneven):
    def world(world_size, workers, state=None, stop_after=None):
        keys, counts = [], []
        for loader in _loaders(uneven, world_size, workers, drop_last=True):
            if state is not None:
                loader.load_state_dict(state)
            batches = [b for _, b in zip(range(stop_after or 10**9), loader)]
            assert all(len(b) == 4 for b in batches)
            keys += [k for b in batches for k in b.keys]
            counts.append(len(batches))
            last = loader.state_dict()
        return keys, counts, last

    head, _, state = world(2, 2, stop_after=4)
    tail, counts, _ = world(3, 1, state=state)
    assert len(set(counts)) == 1 and len(head + tail) == len(set(head + tail))


def test_a_state_saved_before_the_elastic_cursor_still_resumes(uneven):
    first = _loaders(uneven, 1, 0)[0]
    head = [k for _, b in zip(range(3), first) for k in b.keys]
    state = first.state_dict()
    v1 = {k: state[k] for k in ("epoch", "consumed", "batches_consumed", "skipped_in_epoch", "seed",
                                "world_size", "batch_size", "num_streams", "shuffle", "drop_last",
                                "samples_per_epoch")}
    v1.update(version=1, index=uneven.legacy_fingerprint())
    resumed = _loaders(uneven, 1, 0)[0]
    resumed.load_state_dict(v1)
    assert sorted(head + [k for b in resumed for k in b.keys]) == [f"{i:09d}" for i in range(101)]


@pytest.mark.parametrize("world,workers,batch,new_world,new_workers,new_batch",
                         [(2, 2, 4, 3, 2, 3), (2, 1, 4, 1, 1, 8), (3, 2, 5, 2, 2, 2), (2, 2, 4, 2, 2, 6)])
def test_resume_with_another_batch_size(uneven, world, workers, batch, new_world, new_workers, new_batch):
    """A micro-batch change mid-epoch (with or without another world size) is a new generation
    like a world-size change: every remaining sample once, equal steps on every rank."""
    def loaders(w, k, b):
        return [StreamingLoader(uneven, rank=r, world_size=w, batch_size=b, img_size=16, num_workers=k,
                                augment=NO_AUG, shuffle_buffer=10) for r in range(w)]
    head, states = [], []
    for loader in loaders(world, workers, batch):
        for i, b in enumerate(loader, 1):
            head += b.keys
            if i == 4:
                break
        states.append(loader.state_dict())
    tail, counts = [], []
    for loader in loaders(new_world, new_workers, new_batch):
        loader.load_state_dict(json.loads(json.dumps(states[0])))
        got = [b for b in loader]
        tail += [k for b in got for k in b.keys]
        counts.append(len(got))
        assert all(len(b) <= new_batch for b in got)
    assert len(set(counts)) == 1
    assert sorted(head + tail) == [f"{i:09d}" for i in range(101)]
