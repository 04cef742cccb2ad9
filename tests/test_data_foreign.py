"""Bring your own data: shards written by webdataset's own ShardWriter indexed in place (locally,
on the loopback S3 server, on Ray), read by the loader exactly once; a Parquet file holding its
images as a make_shards source; and batches that mix classes on a class-sorted source."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data import AugmentConfig, ShardIndex, ShardOptions, StreamingLoader, write_shards
from pipeline.data.foreign import IndexOptions, index_existing_shards
from pipeline.data.index import ShardTable
from pipeline.data.plan import Generation, PlanConfig, plan_epoch, read_order, shuffle_rng
from pipeline.predict import iter_samples

REPO = Path(__file__).resolve().parents[1]
NAMES = ("cat", "dog", "eel")
NO_AUG = AugmentConfig.off()
N = 40


def _image(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 10, 3), i * 6 % 250, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _key(i: int) -> str:
    return f"dir_{i % 2}/IMG {i:03d}_x-y"         # arbitrary strings: a folder, spaces, dashes


def _samples() -> list[dict]:
    """N samples, JPEG and PNG in turn, labels in cls (integer) and json (name, tags); sample 7
    has no cls, sample 11 no image."""
    out = []
    for i in range(N):
        s = {"__key__": _key(i), "jpg" if i % 2 else "png": _image(i, "JPEG" if i % 2 else "PNG"),
             "cls": str(i % 3).encode(),
             "json": json.dumps({"label": NAMES[i % 3], "tags": sorted({NAMES[i % 3], NAMES[i % 2]})}).encode()}
        if i == 7:
            del s["cls"]
        if i == 11:
            del s["png" if i % 2 == 0 else "jpg"]
        out.append(s)
    return out


def _write(pattern: str, opener=None) -> None:
    kw = {"opener": opener} if opener else {}
    with wds.ShardWriter(pattern, maxcount=10, verbose=0, **kw) as writer:
        for s in _samples():
            writer.write(s)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _read_all(index: ShardIndex, world: int = 2, workers: int = 2, **kw) -> tuple[list[str], list]:
    keys, labels = [], []
    for rank in range(world):
        loader = StreamingLoader(index, rank=rank, world_size=world, batch_size=4, img_size=8,
                                 num_workers=workers, augment=NO_AUG, shuffle_buffer=8, **kw)
        for batch in loader:
            assert not batch.skipped, batch.skipped
            keys += batch.keys
            labels += batch.labels.tolist()
    return keys, labels


def test_shardwriter_shards_are_indexed_in_place_and_read_exactly_once(tmp_path):
    shards = tmp_path / "theirs"
    shards.mkdir()
    _write(str(shards / "train-%06d.tar"))
    before = _digests(shards)
    pattern = str(shards / "train-{000000..000003}.tar")

    summary = index_existing_shards(pattern, str(tmp_path / "ds"), "train", IndexOptions(progress=False))
    assert (summary.num_shards, summary.num_samples, summary.no_label, summary.no_image) == (4, N - 2, 1, 1)
    assert (summary.shards_indexed, summary.shards_reused, summary.failed) == (4, 0, [])
    index = ShardIndex.load(str(tmp_path / "ds" / "train"))
    assert index.label_key == "cls" and index.class_names == ("0", "1", "2") and index.label_type == "single"
    assert index.shards[0].url == str(shards / "train-000000.tar")        # absolute: DEST is elsewhere
    assert list(index.shards.size_bytes) == [(shards / n).stat().st_size for n in before]
    assert [s.sha256 for s in index.shards] == list(before.values())
    assert _digests(shards) == before                                     # never modified

    keys, labels = _read_all(index)
    expected = {_key(i): i % 3 for i in range(N) if i not in (7, 11)}
    assert sorted(keys) == sorted(expected)                               # every sample once
    assert dict(zip(keys, labels)) == expected

    again = index_existing_shards(pattern, str(tmp_path / "ds"), "train", IndexOptions(progress=False))
    assert (again.shards_indexed, again.shards_reused) == (0, 4)          # a re-run reads nothing
    assert ShardIndex.load(str(tmp_path / "ds" / "train")).shards == index.shards

    # shards under DEST/SPLIT: relative URLs; the prediction path reads the recorded label key
    local = index_existing_shards(str(shards), str(tmp_path), "theirs", IndexOptions(progress=False))
    assert local.num_samples == N - 2
    assert ShardIndex.load(str(shards)).shards[0].url == "train-000000.tar"
    predicted = {k: label for k, _, label in iter_samples(str(shards))}
    assert predicted == {**expected, _key(7): -1}            # sample 11 has no image: not a sample


def test_json_labels_by_name_and_multi_label(tmp_path):
    _write(str(tmp_path / "in-%06d.tar"))
    names = index_existing_shards(str(tmp_path / "in-*.tar"), str(tmp_path / "ds"), "named",
                                  IndexOptions(label_key="json:label", progress=False))
    index = ShardIndex.load(str(tmp_path / "ds" / "named"))
    assert names.num_samples == N - 1 and index.class_names == NAMES and index.label_key == "json:label"
    keys, labels = _read_all(index, world=1, workers=1)
    assert dict(zip(keys, labels)) == {_key(i): i % 3 for i in range(N) if i != 11}

    tags = index_existing_shards(str(tmp_path / "in-*.tar"), str(tmp_path / "ds"), "tags",
                                 IndexOptions(label_key="json:tags", progress=False))
    index = ShardIndex.load(str(tmp_path / "ds" / "tags"))
    assert tags.label_type == "multi" and index.label_type == "multi"
    keys, labels = _read_all(index, world=1, workers=0)
    hot = dict(zip(keys, labels))
    for i in (0, 1, 5):
        assert [NAMES[c] for c in np.flatnonzero(hot[_key(i)])] == sorted({NAMES[i % 3], NAMES[i % 2]})


def test_a_brace_pattern_on_s3_and_a_resume_at_another_world_size(s3_endpoint):
    fs, bucket = s3_endpoint["fs"], s3_endpoint["bucket"]
    _write(f"s3://{bucket}/in/train-%06d.tar", opener=lambda p: fs.open(p, "wb"))
    summary = index_existing_shards(f"s3://{bucket}/in/train-{{000000..000003}}.tar", f"s3://{bucket}/ds",
                                    "train", IndexOptions(progress=False))
    index = ShardIndex.load(f"s3://{bucket}/ds/train")
    assert summary.num_samples == index.num_samples == N - 2
    assert index.shard_url(3) == f"s3://{bucket}/in/train-000003.tar"

    first = StreamingLoader(index, rank=0, world_size=1, batch_size=4, img_size=8, num_workers=0,
                            augment=NO_AUG, shuffle_buffer=8)
    head = [k for _, b in zip(range(3), first) for k in b.keys]
    state = first.state_dict()
    tail = []
    for rank in range(2):           # the rest at two ranks, from the same cursor
        loader = StreamingLoader(index, rank=rank, world_size=2, batch_size=3, img_size=8, num_workers=0,
                                 augment=NO_AUG, shuffle_buffer=8)
        loader.load_state_dict(state)
        tail += [k for b in loader for k in b.keys]
    assert sorted(head + tail) == sorted(_key(i) for i in range(N) if i not in (7, 11))


def _job():
    spec = importlib.util.spec_from_file_location("index_shards_job", REPO / "jobs" / "index_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_corrupt_shard_is_left_out_and_bad_inputs_are_one_line_errors(tmp_path, capsys):
    _write(str(tmp_path / "s-%06d.tar"))
    data = (tmp_path / "s-000001.tar").read_bytes()
    (tmp_path / "s-000001.tar").write_bytes(data[:len(data) // 2] + b"\x07" * 1024)   # corrupt mid-member
    (tmp_path / "s-000004.tar").write_bytes(b"not a tar" * 500)
    (tmp_path / "list.txt").write_text("".join(f"s-{i:06d}.tar\n" for i in range(5)) + "# done\n")
    job = _job()
    assert job.main([str(tmp_path / "list.txt"), str(tmp_path / "ds"), "--split", "train", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "left out: 2 unreadable shards, 0 samples without an image, 1 without a label" in out, out
    index = ShardIndex.load(str(tmp_path / "ds" / "train"))
    assert index.num_shards == 3 and index.num_samples == 29          # shards 0, 2, 3: 30 less sample 7
    assert _read_all(index, world=1, workers=0)[0]

    (tmp_path / "names.txt").write_text("0\n1\n")
    for argv, named in [([str(tmp_path / "x-{000000..000009}.tar")], "x-{000000..000009}.tar"),
                        ([str(tmp_path / "s-{000000..000003}.tar"), "--label-key", "txt"], "txt"),
                        ([str(tmp_path / "s-{000000..000003}.tar"), "--label-key", "json:label",
                          "--classes", str(tmp_path / "names.txt")], "'cat'")]:
        assert job.main([*argv, str(tmp_path / "bad"), "--split", "train", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("index_shards: error: ") and len(err.splitlines()) == 1 and named in err, err


@pytest.mark.slow
def test_ray_tasks_index_the_same_as_one_process(tmp_path, ray_local):
    (tmp_path / "in").mkdir()
    _write(str(tmp_path / "in" / "t-%06d.tar"))
    pattern = str(tmp_path / "in" / "t-{000000..000003}.tar")
    local = index_existing_shards(pattern, str(tmp_path / "a"), "train", IndexOptions(progress=False))
    on_ray = index_existing_shards(pattern, str(tmp_path / "b"), "train",
                                   IndexOptions(progress=False, executor="ray", shards_per_task=1))
    assert on_ray.shards_indexed == 4 and local.num_samples == on_ray.num_samples
    assert ShardIndex.load(str(tmp_path / "a" / "train")).shards == ShardIndex.load(str(tmp_path / "b" / "train")).shards


def test_parquet_with_embedded_images_is_a_make_shards_source(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": _image(i, "PNG" if i % 2 else "JPEG"), "path": f"{i}.png"} for i in range(23)]
    images += [{"bytes": None, "path": "missing.png"}, {"bytes": b"garbage", "path": None}]
    table = pa.table({"image": pa.array(images, struct), "label": [i % 3 for i in range(25)]})
    hf = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(NAMES)}}}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()}),
                   tmp_path / "hf.parquet", row_group_size=6)
    options = ShardOptions(samples_per_shard=5, shards_per_part=2, num_workers=1, progress=False)
    summary = write_shards(str(tmp_path / "hf.parquet"), str(tmp_path / "ds"), options=options)
    assert summary.splits["train"].num_samples == 23
    assert sorted(s.reason.split(" (")[0] for s in summary.skipped) == ["corrupt or unsupported image", "file not found"]
    index = ShardIndex.load(str(tmp_path / "ds" / "train"))
    assert index.class_names == NAMES and not index.pre_shuffled
    _, labels = _read_all(index, world=1, workers=0)
    assert Counter(labels) == Counter(i % 3 for i in range(23))

    pq.write_table(pa.table({"jpg": pa.array([_image(i, "JPEG") for i in range(8)], pa.binary()),
                             "labels": [["cat", "eel"] if i % 2 else ["dog"] for i in range(8)]}),
                   tmp_path / "bin.parquet")
    summary = write_shards(str(tmp_path / "bin.parquet"), str(tmp_path / "bin"), options=options)
    index = ShardIndex.load(str(tmp_path / "bin" / "train"))
    assert summary.splits["train"].num_samples == 8 and index.label_type == "multi" and index.class_names == NAMES
    again = write_shards(str(tmp_path / "bin.parquet"), str(tmp_path / "bin"), options=options)
    assert again.splits["train"].shards_reused == index.num_shards     # fingerprinted by row and digest


@pytest.mark.parametrize("lanes", [1, 8, 32])
def test_lanes_keep_the_elastic_cursor_exact(lanes):
    """The plan alone (no data): 60 shards of uneven size, three generations at other world sizes,
    workers, batch sizes and lane counts; every sample is read exactly once."""
    counts = np.random.default_rng(1).integers(5, 40, 60)
    table = ShardTable([f"s{i}.tar" for i in range(60)], counts, np.full(60, -1), np.zeros((60, 32), np.uint8))
    index = ShardIndex("/x", table, ("a",))

    def read(cfg: PlanConfig, generations, consumed=None):
        got = []
        for k, plan in enumerate(plan_epoch(index, 0, cfg, generations)):
            order = list(read_order(plan.position_shard, cfg, shuffle_rng(cfg, 0, k, len(generations))))
            take = len(order) if consumed is None else sum(plan.batch_sizes[:consumed[k]])
            got += [(plan.shards.url(int(plan.position_shard[p])), int(plan.position_offset[p])) for p in order[:take]]
        return got

    def cfg(world, rank, streams, batch, lanes_):
        return PlanConfig(world_size=world, rank=rank, num_streams=streams, batch_size=batch, seed=3, shuffle=True,
                          drop_last=False, samples_per_epoch=None, shuffle_buffer=16, lanes=lanes_)

    g0 = Generation(2, 2, 8, False, 16, (9, 8), lanes)
    g1 = Generation(3, 1, 5, False, 16, (7,), 4)
    got = [x for r in range(2) for x in read(cfg(2, r, 2, 8, lanes), [], g0.consumed)]
    got += [x for r in range(3) for x in read(cfg(3, r, 1, 5, 4), [g0], g1.consumed)]
    got += [x for r in range(1) for x in read(cfg(1, r, 3, 8, 32), [g0, g1])]
    assert len(got) == len(set(got)) == int(counts.sum())


def _class_sorted_shards(tmp_path: Path, n: int = 4000) -> ShardIndex:
    """make_shards on a class-sorted Parquet manifest, at the ratios of a 10^9-sample run: 50
    samples per shard, 2 shards per part, 10 classes (each shard holds one class)."""
    (tmp_path / "img").mkdir()
    for c in range(10):
        (tmp_path / "img" / f"{c}.png").write_bytes(_image(c, "PNG"))
    pq.write_table(pa.table({"image": [f"img/{i * 10 // n}.png" for i in range(n)],
                             "label": [f"c{i * 10 // n}" for i in range(n)]}), tmp_path / "m.parquet")
    write_shards(str(tmp_path / "m.parquet"), str(tmp_path / "ds"),
                 options=ShardOptions(samples_per_shard=50, shards_per_part=2, num_workers=1, progress=False))
    return ShardIndex.load(str(tmp_path / "ds" / "train"))


def distinct_classes_per_batch(index: ShardIndex, **kw) -> float:
    loader = StreamingLoader(index, batch_size=64, img_size=8, num_workers=0, augment=NO_AUG,
                             shuffle_buffer=50, **kw)
    return float(np.mean([len(set(b.labels.tolist())) for b in loader if len(b) == 64]))


def test_batches_mix_classes_on_a_class_sorted_source(tmp_path):
    index = _class_sorted_shards(tmp_path)
    random = 10 * (1 - 0.9 ** 64)                    # expected distinct classes of 64 random draws
    one_shard = distinct_classes_per_batch(index, interleave=1)
    interleaved = distinct_classes_per_batch(index)
    assert one_shard / random < 0.6                  # one shard at a time: ~4.7 of 10
    assert interleaved / random >= 0.9, interleaved  # 32 shards at once per worker
