"""A worker group that cannot be placed fails within scaling.placement_timeout_s with one line naming
what is missing (pipeline.placement), instead of Ray Train retrying its start without limit."""
from __future__ import annotations

import time

import pytest

from pipeline.placement import missing


def test_missing_names_the_resource_that_falls_short():
    p5 = {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0}
    a100 = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}
    worker = {"CPU": 8.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert missing(worker, 64, [p5] * 4) == (32, "short of GPU: 64 needed, 32 in the cluster")
    # GPUs enough in total, but half of them of another type
    assert missing(worker, 64, [p5] * 4 + [a100] * 4) == (
        32, "short of GPU: 64 needed, 32 on the 4 nodes that have CPU, GPU, accelerator_type:H100")
    assert missing(worker, 8, [{"CPU": 8.0}]) == (0, "short of GPU (no node has it); "
                                                     "accelerator_type:H100 (no node has it)")
    # enough in total, but no node has room for a whole worker
    assert missing({"CPU": 4.0}, 2, [{"CPU": 3.0}] * 3)[0] == 0
    assert "none of which has room" in missing({"CPU": 4.0}, 2, [{"CPU": 3.0}] * 3)[1]
    assert missing({"CPU": 1.0}, 2, [{"CPU": 2.0}]) == (2, "the cluster holds them, but other jobs or actors are using them")


@pytest.mark.slow    # starts Ray and Ray Train's controller
def test_training_group_that_cannot_be_placed_fails_in_time(demo_shards, tmp_path, monkeypatch):
    from pipeline import launch
    from pipeline.config import load_config
    from pipeline.placement import PlacementError

    # Ray Train's own per-attempt wait (60 s by default), propagated to its controller; the deadline is ours
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1")
    cfg = load_config("configs/demo.yaml", [
        f"data.root={demo_shards}", "data.write_demo=false", "model.variant=coatnet_pico", "train.steps=2",
        "scaling.num_workers=2", 'scaling.resources_per_worker={"big_gpu": 1}', "scaling.placement_timeout_s=4",
        f"storage.storage_path={tmp_path / 'runs'}", "storage.name=unplaceable",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        launch.run(cfg)
    took = time.monotonic() - start
    msg = str(err.value)
    print(f"{took:.1f} s: {msg}")
    assert "\n" not in msg
    assert msg.startswith("scaling: 2 workers of {CPU: 1, big_gpu: 1} not placed within 4 s")
    assert msg.endswith("short of big_gpu (no node has it)")
    assert took < 90          # Ray start + the 4 s deadline, not a wait without end
