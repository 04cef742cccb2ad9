"""Shard writing as parts: a streamed Parquet manifest, Ray tasks, and a killed run re-run.

The reference is the single-process writer: Ray must write byte-identical shards (same keys, same
samples, same checksums), and a run SIGKILLed mid-way then re-run must end with that same index.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from helpers import job_env, kill_session, start_job

from pipeline.data import ShardIndex, ShardOptions, iter_shard_samples, write_shards
from pipeline.data.sources import ManifestRows, scan_manifest

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "eel")


def _image(i: int, side: int) -> bytes:
    """Noise (slow to re-encode) with a top-left block whose colour says ``i`` (kept by a resize
    and by JPEG: see ``_row``)."""
    pixels = np.random.default_rng(i).integers(0, 255, (side, side, 3), dtype=np.uint8)
    pixels[:side // 2, :side // 2] = (i % 16 * 16 + 8, i // 16 % 16 * 16 + 8, i // 256 * 16 + 8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _row(image: bytes) -> int:
    """The ``i`` of ``_image(i, ...)``, from the centre of its colour block."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=float)
    q = pixels.shape[0] // 4
    r, g, b = (int(v) // 16 for v in pixels[q - 2:q + 2, q - 2:q + 2].reshape(-1, 3).mean(0))
    return r + 16 * g + 256 * b


def _manifest(root: Path, n: int, side: int, row_group_size: int) -> tuple[Path, dict[int, str]]:
    """n class-sorted rows (the worst order for mixing) + 2 bad rows; {row: label}."""
    (root / "imgs").mkdir(parents=True)
    expected, paths, labels = {}, [], []
    for i in range(n):
        data = _image(i, side)
        (root / "imgs" / f"{i}.png").write_bytes(data)
        paths.append(f"imgs/{i}.png")
        labels.append(CLASSES[i * len(CLASSES) // n])
        expected[i] = labels[-1]
    paths += ["imgs/missing.png", "imgs/0.png"]
    labels += ["cat", "unicorn"]
    pq.write_table(pa.table({"image": paths, "label": labels}), root / "m.parquet",
                   row_group_size=row_group_size)
    return root / "m.parquet", expected


def _samples(index: ShardIndex) -> dict[str, tuple[int, str]]:
    """{key: (manifest row of the image, class name)} over the split; every key once."""
    out: dict[str, tuple[str, str]] = {}
    for i in range(index.num_shards):
        for s in iter_shard_samples(index.shard_url(i), sha256=index.shards.sha256_hex(i)):
            assert s.key not in out, f"key {s.key} written twice"
            out[s.key] = (_row(s.image), index.class_names[int(s.files["cls"])])
    return out


def _assert_exactly_once(dest: Path, expected: dict[int, str]) -> None:
    seen: Counter[int] = Counter()
    for split in ("train", "val"):
        index = ShardIndex.load(str(dest / split))
        assert index.class_names == CLASSES and not index.pre_shuffled
        for row, label in _samples(index).values():
            assert expected[row] == label
            seen[row] += 1
    assert seen == Counter(expected.keys())     # every good row once, across both splits


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _manifest(tmp_path_factory.mktemp("manifest"), n=57, side=12, row_group_size=16)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory, monkeypatch_module):
    """The single-process writer; the manifest is only ever read in row ranges."""
    def whole_table(*args, **kwargs):
        raise AssertionError("the whole manifest was read")

    monkeypatch_module.setattr(pq, "read_table", whole_table)
    monkeypatch_module.setattr(pq.ParquetFile, "read", whole_table)
    dest = tmp_path_factory.mktemp("reference")
    summary = write_shards(str(manifest[0]), str(dest), val_fraction=0.2, options=OPTIONS,
                           class_names=CLASSES)
    monkeypatch_module.undo()
    return dest, summary


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# parts of 10 rows over row groups of 16: parts start inside row groups and span two
OPTIONS = ShardOptions(samples_per_shard=5, shards_per_part=2, num_workers=1, progress=False, seed=3)


def test_streamed_manifest_plan_and_rows(manifest):
    path, _ = manifest
    m = scan_manifest(str(path))      # class names from one streamed pass over the label column
    assert (m.num_rows, m.image_column, m.label_column) == (59, "image", "label")
    assert m.class_names == ("cat", "dog", "eel", "unicorn")
    m = scan_manifest(str(path), CLASSES)
    rows = ManifestRows(m, 14, 35).read()             # rows 14..34 cross row groups 0, 1 and 2
    assert [Path(r.source).name for r in rows] == [f"{i}.png" for i in range(14, 35)]
    tail = ManifestRows(m, 55, 59).read()
    assert [type(r).__name__ for r in tail] == ["InputItem"] * 3 + ["SkippedInput"]   # a missing file: when written
    assert tail[3].reason == "label out of range or unknown class: 'unicorn'"

    multi = pa.table({"path": ["a.png", "b.png"], "labels": [["dog", "cat"], ["eel"]]})
    pq.write_table(multi, path.parent / "multi.parquet")
    m = scan_manifest(str(path.parent / "multi.parquet"))
    assert m.label_type == "multi" and m.class_names == CLASSES
    assert [r.labels for r in ManifestRows(m, 0, 2).read()] == [(0, 1), (2,)]


def test_single_process_writer_streams_the_manifest(manifest, reference):
    path, expected = manifest
    dest, summary = reference
    _assert_exactly_once(dest, expected)
    assert sorted(s.reason for s in summary.skipped) == ["file not found",
                                                         "label out of range or unknown class: 'unicorn'"]
    val = ShardIndex.load(str(dest / "val"))
    assert val.num_samples + ShardIndex.load(str(dest / "train")).num_samples == 57
    assert 10 <= val.num_samples <= 12                          # round(0.2 * 59) = 12 rows, 2 bad
    # rows are permuted within their part (of 10 rows): the first 8 train keys come from rows 0-9
    # of the manifest (part 0 gives its first 2 to val), not in manifest order
    train = _samples(ShardIndex.load(str(dest / "train")))
    rows = [row for key, (row, _) in sorted(train.items())][:8]
    assert set(rows) <= set(range(10)) and rows != sorted(rows)


@pytest.mark.slow
def test_ray_writer_equals_single_process_writer(manifest, reference, tmp_path):
    path, expected = manifest
    dest, _ = reference
    opts = ShardOptions(**{**OPTIONS.__dict__, "executor": "ray", "num_workers": 2})
    summary = write_shards(str(path), str(tmp_path / "ray"), val_fraction=0.2, options=opts,
                           class_names=CLASSES)
    for split in ("train", "val"):
        assert ShardIndex.load(str(tmp_path / "ray" / split)).shards == ShardIndex.load(str(dest / split)).shards
    assert summary.splits["train"].shards_written == ShardIndex.load(str(dest / "train")).num_shards
    _assert_exactly_once(tmp_path / "ray", expected)


@pytest.mark.slow
def test_ray_writer_killed_and_rerun_writes_only_what_is_missing(ray_cluster, tmp_path):
    """SIGKILL the job's driver (attached to the session's cluster: Ray then ends its tasks) once
    some shards are recorded; the re-run keeps those, writes the rest, and the result is the
    single-process writer's, byte for byte."""
    path, expected = _manifest(tmp_path / "src", n=300, side=96, row_group_size=64)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    args = ["--classes", str(tmp_path / "classes.txt"), "--samples-per-shard", "4", "--shards-per-part", "1", "--max-side", "48", "--seed", "1",
            "--val-fraction", "0.1", "--no-progress"]
    options = ShardOptions(samples_per_shard=4, shards_per_part=1, max_side=48, seed=1, num_workers=1,
                           progress=False)
    write_shards(str(path), str(tmp_path / "reference"), val_fraction=0.1, options=options,
                 class_names=CLASSES)
    num_shards = sum(ShardIndex.load(str(tmp_path / "reference" / s)).num_shards for s in ("train", "val"))

    cli = [sys.executable, str(REPO / "jobs" / "make_shards.py"), str(path), str(tmp_path / "out"),
           "--ray", "--workers", "2", *args]
    env = job_env(ray_cluster)
    job = start_job(cli, env, tmp_path, tmp_path / "first.log")
    records = lambda: list((tmp_path / "out").glob("*/_progress/*.json"))  # noqa: E731
    t0 = time.time()
    while not records():
        assert job.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() - t0 < 300, "no shard was recorded in 300 s"
        time.sleep(0.02)
    kill_session(job)
    done_before = -1
    while done_before != len(records()):      # until Ray has ended the killed job's tasks
        done_before = len(records())
        time.sleep(2)
    assert 0 < done_before < num_shards
    assert not (tmp_path / "out" / "train" / "index.parquet").exists()

    rerun = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reused = sum(int(line.split(" written, ")[1].split(" already")[0])
                 for line in rerun.stdout.splitlines() if " already complete" in line)
    # kept, not rewritten
    assert done_before == reused < num_shards
    for split in ("train", "val"):
        assert (ShardIndex.load(str(tmp_path / "out" / split)).shards
                == ShardIndex.load(str(tmp_path / "reference" / split)).shards)
    _assert_exactly_once(tmp_path / "out", expected)
    assert json.loads((tmp_path / "out" / "train" / "_progress" / "shard-000000.json").read_text())["num_samples"] > 0
