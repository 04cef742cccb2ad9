"""The fine-tuning source (pipeline.finetune), no workers: checked from the safetensors headers,
staged as files (on S3), resized and given a new head by the surgery, refused with a clear error
when it does not fit."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import models
from pipeline.config import load_config


VARIANT = "coatnet_pico"


def _tables(sd):
    return {k: v for k, v in sd.items() if k.endswith("relative_position_bias_table")}


def test_finetune_surgery_resizes_tables_and_replaces_head(tmp_path):
    import models

    from pipeline.finetune import adapt, resolve_source
    from pipeline.finetune import FinetuneError

    torch.manual_seed(0)
    pre = models.create_model(VARIANT, num_classes=10, img_size=32)
    with torch.no_grad():                       # non-trivial tables, so interpolation shows
        for k, v in _tables(pre.state_dict()).items():
            v.copy_(torch.randn_like(v))
    torch.save(pre.state_dict(), tmp_path / "model.pt")
    src = resolve_source(str(tmp_path / "model.pt"))
    assert src.kind == "weights"
    src.variant = VARIANT

    # the driver's check reads no weight: meta tensors from the file, the fit decided by shapes
    checked, dropped = adapt(src, VARIANT, 64, 10)
    assert dropped == [] and all(v.is_meta for v in checked.values())

    # 64 px, same classes: every table grows and equals bilinear interpolation; the head is kept
    sd, dropped = adapt(src, VARIANT, 64, 10, state_dict=src.load())
    assert dropped == []
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in checked.items()}
    old = _tables(pre.state_dict())
    assert old
    new_model = models.create_model(VARIANT, num_classes=10, img_size=64)
    for k, t in old.items():
        target = new_model.state_dict()[k].shape
        assert sd[k].shape == target and target != t.shape, (k, t.shape, target)
        ref = F.interpolate(t[None].float(), size=tuple(target[-2:]), mode="bilinear", align_corners=False)[0]
        assert torch.allclose(sd[k], ref, atol=1e-6), k
    missing, unexpected = new_model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if m in pre.state_dict()]

    # another label set: the classifier is re-initialised, the body is the pretrained one
    sd5, dropped5 = adapt(src, VARIANT, 64, 5, state_dict=src.load())
    assert dropped5 and all(k.startswith("head.") for k in dropped5)
    m5 = models.create_model(VARIANT, num_classes=5, img_size=64)
    before = {k: v.clone() for k, v in m5.state_dict().items()}
    missing, _ = m5.load_state_dict(sd5, strict=False)
    assert sorted(missing) == sorted(dropped5)
    assert m5.state_dict()["head.fc.weight"].shape[0] == 5
    assert torch.equal(m5.state_dict()["head.fc.weight"], before["head.fc.weight"])   # fresh head
    body = [k for k in sd5 if not k.startswith("head.") and k not in old]
    assert all(torch.equal(m5.state_dict()[k], pre.state_dict()[k]) for k in body)

    # incompatible: another variant named, or another variant's weights
    with pytest.raises(FinetuneError, match="incompatible checkpoint.*coatnet_pico.*coatnet_nano"):
        adapt(src, "coatnet_nano", 64, 10)
    nano = models.create_model("coatnet_nano", num_classes=10, img_size=32)
    torch.save(nano.state_dict(), tmp_path / "nano.pt")
    with pytest.raises(FinetuneError, match="incompatible checkpoint"):
        adapt(resolve_source(str(tmp_path / "nano.pt")), VARIANT, 64, 10)
    with pytest.raises(FinetuneError, match="no such run id"):
        resolve_source(str(tmp_path / "nothing-here"))


def test_finetune_source_is_checked_from_headers_and_staged_as_files(tmp_path, s3_endpoint):
    """A fine-tuning source is never loaded whole on the driver: its shapes come from the
    safetensors headers (meta tensors), its files are copied to the run's init/ folder (here on
    S3, sharded) byte for byte; a source that does not fit fails before anything is copied."""
    from pipeline import finetune
    from pipeline.weights import load_weights, weight_files, weight_shapes, write_weights

    sd = models.create_model("coatnet_pico", num_classes=10, img_size=32).state_dict()
    src_url = f"s3://{s3_endpoint['bucket']}/pre/weights"
    write_weights(src_url, sd.items(), max_shard_bytes=100_000)
    assert len(weight_files(src_url)) > 2
    shapes = weight_shapes(src_url)
    assert all(v.is_meta for v in shapes.values())
    assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == \
        {k: (v.shape, v.float().dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}

    source = finetune.resolve_source(src_url)
    assert source.kind == "weights" and source.scratch is None
    runs = f"s3://{s3_endpoint['bucket']}/runs"
    cfg = load_config("configs/demo.yaml", ["model.variant=coatnet_pico", "model.img_size=64",
                                            "model.num_classes=5", f"storage.storage_path={runs}",
                                            "storage.name=ft"])
    staged, dropped = finetune.stage_init(cfg, source)
    assert sorted(dropped) == ["head.fc.bias", "head.fc.weight"]           # 10 -> 5 classes, checked on meta
    assert staged.init.from_checkpoint == f"{runs}/ft/init" and cfg.init.from_checkpoint is None
    fs = s3_endpoint["fs"]
    for a, b in zip(weight_files(src_url), weight_files(staged.init.from_checkpoint)):
        assert a.rsplit("/", 1)[1] == b.rsplit("/", 1)[1] and fs.cat(a) == fs.cat(b)
    back = load_weights(staged.init.from_checkpoint)
    assert all(torch.equal(back[k], sd[k].float() if sd[k].is_floating_point() else sd[k]) for k in sd)

    wrong = load_config("configs/demo.yaml", ["model.variant=coatnet_nano", "model.num_classes=10",
                                              f"storage.storage_path={tmp_path}", "storage.name=bad"])
    with pytest.raises(finetune.FinetuneError, match="incompatible checkpoint"):
        finetune.stage_init(wrong, source)
    assert not (tmp_path / "bad").exists()                                 # nothing staged


def test_a_killed_drivers_scratch_folder_goes_with_the_next_source(tmp_path, monkeypatch):
    """What a driver downloaded or consolidated for a source lives in <tmp>/coatnet-source-<pid>-*;
    one killed before removing it leaves it behind, and the next driver on the host removes it
    (folders of live processes are kept)."""
    import subprocess
    import sys
    import tempfile

    from pipeline import finetune

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                            # a pid no process has any more
    dead = tmp_path / f"{finetune.SCRATCH_PREFIX}{gone.pid}-abc"
    alive = tmp_path / f"{finetune.SCRATCH_PREFIX}{os.getppid()}-abc"
    for d in (dead, alive):
        (d / "weights").mkdir(parents=True)
    mine = finetune.new_scratch()
    assert not dead.exists() and alive.exists()
    assert os.path.basename(mine).startswith(f"{finetune.SCRATCH_PREFIX}{os.getpid()}-")
