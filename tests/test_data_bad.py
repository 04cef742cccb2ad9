"""Bad data: every kind is skipped and counted (or is an error), never lost silently."""
from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port, jpeg, write_index

from pipeline.data import (AugmentConfig, DataError, RetryPolicy, ShardIndex, StreamingLoader, write_demo_shards)

NO_AUG = AugmentConfig.off()


BAD_SAMPLES = {
    "badimage": ({"jpg": b"\xff\xd8\xff\xe0 garbage", "cls": b"1"}, "corrupt image"),
    "nolabel": ({"jpg": jpeg(10)}, "missing label"),
    "outofrange": ({"jpg": jpeg(20), "cls": b"7"}, "label out of range"),
    "textlabel": ({"jpg": jpeg(30), "cls": b"dog"}, "unparseable label"),
    "noimage": ({"cls": b"0"}, "no image entry"),
}


@pytest.fixture
def mixed(tmp_path) -> ShardIndex:
    good = [(f"good{i:02d}", {"jpg": jpeg(8 * i), "cls": str(i % 3).encode()}) for i in range(25)]
    bad = [(key, files) for key, (files, _) in BAD_SAMPLES.items()]
    return write_index(tmp_path, [good[:10] + bad[:3], good[10:] + bad[3:]])


def test_bad_samples_are_skipped_and_counted_with_shard_and_key(mixed):
    loader = StreamingLoader(mixed, batch_size=4, img_size=16, num_workers=2, augment=NO_AUG,
                             max_skip_fraction=0.2)
    keys = [k for batch in loader for k in batch.keys]
    assert sorted(keys) == [f"good{i:02d}" for i in range(25)]
    assert loader.stats.skipped == 5 and loader.stats.samples == 25
    skipped = {s.key: s for s in loader.stats.skipped_samples}
    assert set(skipped) == set(BAD_SAMPLES)
    for key, (_, reason) in BAD_SAMPLES.items():
        assert skipped[key].reason.startswith(reason)
        assert skipped[key].shard == ("shard-000000.tar" if key in ("badimage", "nolabel", "outofrange")
                                      else "shard-000001.tar")


def test_skips_over_the_allowed_fraction_stop_the_run_naming_them(mixed):
    loader = StreamingLoader(mixed, batch_size=4, img_size=16, num_workers=0, augment=NO_AUG)
    with pytest.raises(DataError, match=r"of 30 samples of rank 0 skipped in epoch 0") as err:
        list(loader)
    assert "shard-00000" in str(err.value) and any(k in str(err.value) for k in BAD_SAMPLES)


@pytest.fixture
def demo30(tmp_path) -> ShardIndex:
    write_demo_shards(str(tmp_path), num_train=30, num_val=0, image_size=16, samples_per_shard=10)
    return ShardIndex.load(str(tmp_path / "train"))


def _read_all(index: ShardIndex, **kw) -> tuple[list[str], StreamingLoader]:
    loader = StreamingLoader(index, batch_size=4, img_size=16, num_workers=2, augment=NO_AUG, **kw)
    return [k for batch in loader for k in batch.keys], loader


def test_truncated_shard_loses_only_what_is_missing_and_counts_it(demo30):
    path = Path(demo30.shard_url(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with tarfile.open(fileobj=io.BytesIO(data[: len(data) // 2]), mode="r|") as tar:
        readable = set()
        try:
            for m in tar:
                if m.name.endswith(".cls"):
                    readable.add(m.name.split(".")[0])
        except tarfile.ReadError:
            pass
    keys, loader = _read_all(demo30, max_skip_fraction=0.5)
    lost = {f"{i:09d}" for i in range(10, 20)} - readable
    assert sorted(keys) == sorted({f"{i:09d}" for i in range(30)} - lost)
    assert 0 < loader.stats.skipped == len(lost)
    assert all(s.shard == "shard-000001.tar" and "truncated" in s.reason
               for s in loader.stats.skipped_samples)


def test_shard_that_fails_to_open_is_counted(demo30):
    Path(demo30.shard_url(2)).unlink()
    keys, loader = _read_all(demo30, max_skip_fraction=0.5)
    assert sorted(keys) == [f"{i:09d}" for i in range(20)]
    assert loader.stats.skipped == 10 and loader.stats.retries == 0    # not retried: it is gone
    assert {s.key for s in loader.stats.skipped_samples} == {f"#{i}" for i in range(10)}
    assert all("FileNotFoundError" in s.reason for s in loader.stats.skipped_samples)
    with pytest.raises(DataError, match="shard-000002.tar #"):
        _read_all(demo30)


def test_checksum_mismatch_is_an_error(demo30):
    path = Path(demo30.shard_url(0))
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar if m.name.endswith(".cls"))
    old = data[member.offset_data]
    data[member.offset_data] = ord("0") if old != ord("0") else ord("1")   # still a valid label
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch for shard .*shard-000000.tar"):
        _read_all(demo30)


def test_missing_or_malformed_index_is_a_readable_error(tmp_path):
    with pytest.raises(DataError, match="no shard index at"):
        ShardIndex.load(str(tmp_path / "nothing"))
    (tmp_path / "index.json").write_text('{"format": "coatnet-shards/1", "shards": [{"url": 1}]}')
    with pytest.raises(DataError, match="malformed shard index"):
        ShardIndex.load(str(tmp_path))


@pytest.mark.timeout(180)
def test_s3_outage_is_retried_then_counted(monkeypatch):
    """The endpoint goes away mid-epoch and comes back on the same port: nothing is lost.
    Gone for good: the shards are counted as skipped and the run stops naming them.

    The DataLoader worker is started by a forkserver: a forked worker would inherit the
    in-process server's listening socket, keep the port open while "down" and stop the restart."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
                        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir("outage")
        write_demo_shards("s3://outage/ds", num_train=60, num_val=0, image_size=16, samples_per_shard=10)
        index = ShardIndex.load("s3://outage/ds/train")
        retry = RetryPolicy(attempts=12, initial_delay_s=0.25, max_delay_s=1.0)
        loader = StreamingLoader(index, batch_size=5, img_size=16, num_workers=1, train=False,
                                 prefetch_factor=1, retry=retry, multiprocessing_context="forkserver")
        batches = iter(loader)
        keys = list(next(batches).keys)
        server.stop()
        restart = threading.Timer(2.5, server.start)
        restart.start()
        started = time.monotonic()
        keys += [k for batch in batches for k in batch.keys]
        restart.join()
        assert sorted(keys) == [f"{i:09d}" for i in range(60)]
        assert loader.stats.skipped == 0 and loader.stats.retries >= 1
        assert time.monotonic() - started > 1.0          # it did wait for the endpoint

        server.stop()
        gone = StreamingLoader(index, batch_size=5, img_size=16, num_workers=0, train=False,
                               retry=RetryPolicy(attempts=2, initial_delay_s=0.05))
        with pytest.raises(DataError, match="shard failed to open or read"):
            list(gone)
        assert gone.stats.retries >= 1
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
