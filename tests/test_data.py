"""Shard writing and the streaming loader, on a local folder and on the loopback S3 endpoint."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (DEMO_CLASSES, AugmentConfig, ShardIndex, ShardOptions, StreamingLoader,
                           write_demo_shards, write_shards)

REPO = Path(__file__).resolve().parent.parent
NO_AUG = AugmentConfig.off()


@pytest.fixture(params=["local", "s3"])
def dest_root(request, tmp_path):
    """A dataset root: a local folder, or a prefix in a fresh bucket on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "ds")
    s3 = request.getfixturevalue("s3_endpoint")
    return f"s3://{s3['bucket']}/ds"


def read_shards(index: ShardIndex) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, read independently of the loader: {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    for i, shard in enumerate(index.shards):
        with fsspec.open(index.shard_url(i), "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        assert len(data) == shard.size_bytes
        keys = set()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                keys.add(key)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len(keys) == shard.num_samples
    return samples


def keys_of_epoch(index, *, world_size, num_workers, batch_size, epoch=0, **kw):
    """Keys per rank (in yield order) and batch counts per rank for one epoch."""
    keys, counts = [], []
    for rank in range(world_size):
        loader = StreamingLoader(index, rank=rank, world_size=world_size, batch_size=batch_size,
                                 img_size=16, num_workers=num_workers, augment=NO_AUG, **kw)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        keys.append([k for b in batches for k in b.keys])
        counts.append(len(batches))
    return keys, counts


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def test_demo_shards_index_matches_what_was_written(dest_root):
    summary = write_demo_shards(dest_root, num_train=70, num_val=15, image_size=24,
                                samples_per_shard=20)
    train = ShardIndex.load(f"{dest_root}/train")
    val = ShardIndex.load(f"{dest_root}/val/index.json")
    assert [s.num_samples for s in train.shards] == [20, 20, 20, 10]
    assert val.num_samples == 15 and train.class_names == DEMO_CLASSES
    assert train.label_type == "single" and summary.splits["train"].shards_written == 4

    samples = read_shards(train)
    assert sorted(samples) == [f"{i:09d}" for i in range(70)]
    labels = [int(s["cls"]) for s in samples.values()]
    assert set(labels) == set(range(10))                 # every class present
    first = Image.open(io.BytesIO(samples["000000000"]["jpg"]))
    assert first.size == (24, 24)

    again = write_demo_shards(dest_root, num_train=70, num_val=15, image_size=24, samples_per_shard=20)
    assert again.splits["train"].shards_written == 0     # complete: nothing rewritten
    assert ShardIndex.load(f"{dest_root}/train") == train


def test_demo_writer_is_deterministic_and_resumes_after_a_lost_shard(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_demo_shards(a, num_train=40, num_val=0, image_size=16, samples_per_shard=10)
    write_demo_shards(b, num_train=40, num_val=0, image_size=16, samples_per_shard=10, num_workers=2)
    index_a, index_b = ShardIndex.load(f"{a}/train"), ShardIndex.load(f"{b}/train")
    assert [s.sha256 for s in index_a.shards] == [s.sha256 for s in index_b.shards]

    # An interrupted run: a shard's tar vanished and the index was never written.
    (tmp_path / "b" / "train" / "shard-000002.tar").unlink()
    (tmp_path / "b" / "train" / "index.json").unlink()
    summary = write_demo_shards(b, num_train=40, num_val=0, image_size=16, samples_per_shard=10)
    assert (summary.splits["train"].shards_written, summary.splits["train"].shards_reused) == (1, 3)
    assert ShardIndex.load(f"{b}/train").shards == index_a.shards


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


CLASS_COLOURS = {"cat": (250, 0, 0), "dog": (0, 250, 0), "eel": (0, 0, 250)}


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 8 images of the class colour (PNG, JPEG, various sizes) + 2 bad files."""
    root = tmp_path / "folder"
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(8):
            size = (20 + 7 * i, 30)
            if i % 2:
                Image.new("RGB", size, colour).save(root / name / f"{i}.jpg", quality=95)
            else:
                (root / name / f"{i}.png").write_bytes(_png(colour, size))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "eel" / "notes.txt").write_text("not an image")
    return root


def _label_colour_pairs(samples):
    for files in samples.values():
        ext = next(e for e in files if e in ("jpg", "png"))
        pixel = np.asarray(Image.open(io.BytesIO(files[ext])).convert("RGB"))[5, 5]
        yield int(files["cls"]), tuple(int(v) for v in pixel)


def test_image_folder_to_train_and_val(image_folder, dest_root):
    summary = write_shards(str(image_folder), dest_root, val_fraction=0.25,
                           options=ShardOptions(samples_per_shard=7, max_side=32, num_workers=2,
                                                progress=False))
    reasons = sorted(s.reason for s in summary.skipped)
    assert len(reasons) == 2
    assert reasons[0].startswith("corrupt or unsupported image") and reasons[1] == "not an image file (.txt)"
    train, val = ShardIndex.load(f"{dest_root}/train"), ShardIndex.load(f"{dest_root}/val")
    # 24 inputs listed, 6 to val, one of the 24 (broken.jpg) skipped while writing.
    assert train.num_samples + val.num_samples == 24 and val.num_samples in (5, 6)
    assert train.class_names == ("cat", "dog", "eel")
    for index in (train, val):
        samples = read_shards(index)
        for label, pixel in _label_colour_pairs(samples):
            expected = CLASS_COLOURS[index.class_names[label]]
            assert max(abs(a - b) for a, b in zip(pixel, expected)) < 12
        for files in samples.values():
            ext = next(e for e in files if e in ("jpg", "png"))
            assert max(Image.open(io.BytesIO(files[ext])).size) <= 32
    assert "skipped inputs: 2" in summary.format()


def test_manifest_csv_multi_label_and_parquet(tmp_path, dest_root):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(12):
        (images / f"{i}.png").write_bytes(_png((20 * i, 0, 0), (16, 16)))
        rows.append({"image": f"imgs/{i}.png", "labels": ["cat|dog", "eel", "dog|eel|cat"][i % 3]})
    rows.append({"image": "imgs/0.png", "labels": ""})                  # missing label
    rows.append({"image": "imgs/missing.png", "labels": "cat"})         # file not found
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    summary = write_shards(str(tmp_path / "m.csv"), f"{dest_root}/multi",
                           options=ShardOptions(samples_per_shard=5, num_workers=1, progress=False))
    assert sorted(s.reason for s in summary.skipped) == ["file not found", "missing label"]
    index = ShardIndex.load(f"{dest_root}/multi/train")
    assert index.label_type == "multi" and index.class_names == ("cat", "dog", "eel")
    # 13 rows with a label -> shards of 5, 5, 3 inputs; the missing file is skipped in one of them.
    assert sorted(s.num_samples for s in index.shards) == [3, 4, 5] and index.num_samples == 12
    by_red = {int(np.asarray(Image.open(io.BytesIO(f["png"])))[0, 0, 0]) // 20: json.loads(f["json"])["labels"]
              for f in read_shards(index).values()}
    assert by_red == {i: [[0, 1], [2], [0, 1, 2]][i % 3] for i in range(12)}

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"path": [f"imgs/{i}.png" for i in range(6)], "label": [0, 1, 2, 0, 1, 5]}),
                   tmp_path / "m.parquet")
    summary = write_shards(str(tmp_path / "m.parquet"), f"{dest_root}/single", split="val",
                           class_names=["a", "b", "c"],
                           options=ShardOptions(num_workers=1, progress=False))
    assert [s.reason for s in summary.skipped] == ["label out of range or unknown class: '5'"]
    index = ShardIndex.load(f"{dest_root}/single/val")
    assert index.num_samples == 5 and index.class_names == ("a", "b", "c")


def test_cli_help_and_readable_errors(tmp_path, capsys):
    cli = [sys.executable, str(REPO / "jobs" / "make_shards.py")]
    assert "--val-fraction" in subprocess.run(cli + ["--help"], capture_output=True, text=True,
                                              check=True).stdout
    out = subprocess.run(cli + [str(tmp_path / "nowhere"), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "make_shards: error: source folder" in out.stderr and "does not exist" in out.stderr

    make_shards = runpy.run_path(str(REPO / "jobs" / "make_shards.py"))   # in-process: no torch import
    (tmp_path / "bad.csv").write_text("filename,colour\na.png,red\n")
    assert make_shards["main"]([str(tmp_path / "bad.csv"), str(tmp_path / "out")]) == 2
    assert "needs an image column" in capsys.readouterr().err
    assert make_shards["main"](["demo", str(tmp_path / "demo"), "--num-train", "30", "--num-val", "10",
                                "--image-size", "16", "--no-progress", "--workers", "1"]) == 0
    assert "train: 30 samples in 1 shards" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("")
    assert make_shards["main"](["demo", str(tmp_path / "a_file" / "ds"), "--num-train", "5",
                                "--num-val", "0", "--no-progress", "--workers", "1"]) == 2
    assert "shard-000000.tar failed" in capsys.readouterr().err
    assert ShardIndex.load(str(tmp_path / "demo" / "val")).num_samples == 10


# --------------------------------------------------------------------------------------------
# Reading: split, determinism, resume
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> ShardIndex:
    """101 samples in shards of 23, 23, 23, 23, 9."""
    root = str(tmp_path_factory.mktemp("uneven"))
    write_demo_shards(root, num_train=101, num_val=0, image_size=20, samples_per_shard=23)
    return ShardIndex.load(f"{root}/train")


def all_keys(index: ShardIndex) -> list[str]:
    return [f"{i:09d}" for i in range(index.num_samples)]


def test_exactly_once_over_two_ranks_and_two_workers_on_s3(s3_endpoint):
    root = f"s3://{s3_endpoint['bucket']}/ds"
    write_demo_shards(root, num_train=101, num_val=0, image_size=20, samples_per_shard=23)
    index = ShardIndex.load(f"{root}/train")
    keys, counts = keys_of_epoch(index, world_size=2, num_workers=2, batch_size=8)
    assert sorted(keys[0] + keys[1]) == all_keys(index)
    assert counts == [7, 7]                            # ceil(ceil(101 / 2) / 8) on both ranks


@pytest.mark.parametrize("world_size,num_workers,batch_size", [(2, 2, 8), (3, 2, 5), (2, 0, 16)])
def test_exactly_once_with_uneven_shards(uneven, world_size, num_workers, batch_size):
    keys, counts = keys_of_epoch(uneven, world_size=world_size, num_workers=num_workers,
                                 batch_size=batch_size)
    assert sorted(k for rank_keys in keys for k in rank_keys) == all_keys(uneven)
    assert len(set(counts)) == 1


def test_fewer_shards_than_readers(tmp_path):
    write_demo_shards(str(tmp_path), num_train=30, num_val=0, image_size=16, samples_per_shard=30)
    index = ShardIndex.load(str(tmp_path / "train"))
    assert index.num_shards == 1
    keys, counts = keys_of_epoch(index, world_size=2, num_workers=2, batch_size=4)
    assert sorted(keys[0] + keys[1]) == all_keys(index) and counts == [4, 4]


def test_drop_last_yields_full_equal_batches(uneven):
    keys, counts = keys_of_epoch(uneven, world_size=2, num_workers=2, batch_size=8, drop_last=True)
    assert counts == [6, 6] and len(set(keys[0] + keys[1])) == 96


def test_deterministic_per_seed_and_epoch_reshuffled_across_epochs(uneven):
    run = lambda epoch, seed=0: keys_of_epoch(uneven, world_size=2, num_workers=2, batch_size=8,
                                              epoch=epoch, seed=seed)[0]
    epoch0, epoch1 = run(0), run(1)
    assert run(0) == epoch0
    assert epoch1 != epoch0 and run(0, seed=1) != epoch0
    assert sorted(epoch1[0] + epoch1[1]) == all_keys(uneven)
    # Shuffled beyond the shard order: a rank's first batch is not a run of consecutive keys.
    first = sorted(int(k) for k in epoch0[0][:8])
    assert first != list(range(first[0], first[0] + 8))


def test_eval_order_and_resolution(uneven):
    loader = StreamingLoader(uneven, batch_size=10, img_size=40, train=False, num_workers=0)
    batches = list(loader)
    assert [k for b in batches for k in b.keys] == all_keys(uneven)      # no shuffle in eval
    assert batches[0].images.shape == (10, 3, 40, 40)
    assert torch.equal(batches[0].targets, torch.nn.functional.one_hot(batches[0].labels, 10).float())


def test_train_transforms_mixup_and_label_smoothing(uneven):
    augment = AugmentConfig(randaug_n=2, randaug_m=9, mixup_alpha=0.8, cutmix_alpha=1.0,
                            label_smoothing=0.1, crop_scale=(0.5, 1.0))
    loader = StreamingLoader(uneven, batch_size=16, img_size=32, num_workers=0, augment=augment)
    batch = next(iter(loader))
    assert batch.images.shape == (16, 3, 32, 32) and batch.images.dtype == torch.float32
    assert torch.allclose(batch.targets.sum(1), torch.ones(16))
    assert batch.targets.min() >= 0.1 / 10 - 1e-6          # smoothing floor eps / C
    assert (batch.targets.max(1).values < 0.91 - 1e-4).any()   # some rows are mixed


def test_multi_label_targets_are_multi_hot(tmp_path):
    write_demo_shards(str(tmp_path), num_train=24, num_val=0, image_size=16, samples_per_shard=12,
                      multi_label=True)
    index = ShardIndex.load(str(tmp_path / "train"))
    truth = {k: json.loads(f["json"])["labels"] for k, f in read_shards(index).items()}
    assert index.label_type == "multi" and any(len(v) > 1 for v in truth.values())
    loader = StreamingLoader(index, batch_size=8, img_size=16, num_workers=0, augment=NO_AUG)
    for batch in loader:
        assert batch.labels.dtype == torch.float32 and batch.labels.shape == (len(batch), 10)
        assert torch.equal(batch.targets, batch.labels)
        for key, row in zip(batch.keys, batch.labels):
            assert row.nonzero().flatten().tolist() == truth[key]


@pytest.mark.parametrize("num_workers,stop_after", [(2, 5), (0, 3), (2, 1)])
def test_resume_mid_epoch_loses_and_repeats_nothing(uneven, num_workers, stop_after):
    make = lambda: StreamingLoader(uneven, rank=1, world_size=2, batch_size=4, img_size=16,
                                   num_workers=num_workers, shuffle_buffer=10)
    reference = {b.index: b for b in make()}

    first = make()
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == stop_after:
            break
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches_consumed"] == stop_after

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(0)                                  # what a training loop does: keeps the position
    assert resumed.batches_remaining == len(resumed) - stop_after
    rest = list(resumed)
    assert sorted(b.index for b in seen + rest) == list(range(len(reference)))
    for batch in seen + rest:          # the same batches, augmentation included, as without a stop
        assert batch.keys == reference[batch.index].keys
        assert torch.equal(batch.images, reference[batch.index].images)
    assert resumed.epoch == 1 and resumed.state_dict()["batches_consumed"] == 0


def test_resume_does_not_reopen_consumed_shards(uneven, monkeypatch):
    import pipeline.data.reader as reader_module

    opened = []
    real_open = reader_module.open_file
    monkeypatch.setattr(reader_module, "open_file", lambda url, *a, **k: opened.append(url) or real_open(url, *a, **k))
    make = lambda: StreamingLoader(uneven, batch_size=10, img_size=16, train=False, num_workers=0)
    first = make()
    head = [k for _, batch in zip(range(8), first) for k in batch.keys]    # 80 samples: shards 0-2 and 11 of shard 3
    opened.clear()
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = [k for batch in resumed for k in batch.keys]
    assert head + tail == all_keys(uneven)
    assert [Path(u).name for u in opened] == ["shard-000003.tar", "shard-000004.tar"]


def test_resume_rejects_a_different_plan(uneven):
    """Mid-epoch, another seed or shuffle would change which samples remain (another batch size or
    world size is a new generation: tests/test_data_elastic.py); a resampled epoch keeps its shape."""
    loader = StreamingLoader(uneven, batch_size=4, img_size=16, num_workers=0)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        StreamingLoader(uneven, batch_size=4, img_size=16, num_workers=0, seed=1).load_state_dict(state)
    resampled = StreamingLoader(uneven, batch_size=4, img_size=16, num_workers=0, samples_per_epoch=40)
    next(iter(resampled))
    with pytest.raises(ValueError, match="batch_size"):
        StreamingLoader(uneven, batch_size=8, img_size=16, num_workers=0,
                        samples_per_epoch=40).load_state_dict(resampled.state_dict())


def test_resampled_epochs_have_a_fixed_length_and_resume(uneven):
    make = lambda rank: StreamingLoader(uneven, rank=rank, world_size=2, batch_size=8, img_size=16,
                                        num_workers=2, samples_per_epoch=100, augment=NO_AUG)
    loaders = [make(0), make(1)]
    assert [len(x) for x in loaders] == [6, 6]
    epochs = [[b.keys for b in loaders[0]] for _ in range(2)]
    assert all(len(keys) == 8 for epoch in epochs for keys in epoch) and epochs[0] != epochs[1]
    assert loaders[1].epoch == 0 and len(list(loaders[1])) == 6

    stopped = make(0)
    it = iter(stopped)
    head = [next(it).keys for _ in range(4)]
    del it
    resumed = make(0)
    resumed.load_state_dict(stopped.state_dict())
    tail = [b.keys for b in resumed]
    assert sorted(head + tail) == sorted(epochs[0])
