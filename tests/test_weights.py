"""fp32 weights as files (pipeline.weights): one safetensors layout, sharded or not, read back whole
or as meta tensors from the headers; legacy .pt files still read; the fine-tuning surgery."""
from __future__ import annotations

import pytest
import torch

import models
from pipeline.weights import adapt_state_dict


def test_weights_round_trip_sharded_safetensors(tmp_path):
    """write_weights shards above max_shard_bytes (with an index) and load_weights reads any layout:
    the one folder format of consolidated, exported, staged and registered weights."""
    import json

    from pipeline.weights import SAFETENSORS_INDEX, load_weights, weight_files, write_weights

    sd = models.create_model("coatnet_pico", num_classes=10, img_size=32).state_dict()
    write_weights(str(tmp_path / "one"), sd.items())
    write_weights(str(tmp_path / "many"), sd.items(), max_shard_bytes=100_000)
    assert [p.rsplit("/", 1)[1] for p in weight_files(str(tmp_path / "one"))] == ["model.safetensors"]
    shards = weight_files(str(tmp_path / "many"))
    assert len(shards) > 2 and json.loads((tmp_path / "many" / SAFETENSORS_INDEX).read_text())["weight_map"]
    for folder in ("one", "many"):
        back = load_weights(str(tmp_path / folder))
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k].float() if sd[k].is_floating_point()
                                                            else sd[k]) for k in sd)
    torch.save(sd, tmp_path / "legacy.pt")                      # the first build's files still load
    assert load_weights(str(tmp_path / "legacy.pt")).keys() == sd.keys()


def test_init_from_checkpoint_resizes_and_swaps_head():
    src = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    dst = models.create_model("coatnet_pico", num_classes=5, img_size=64)
    sd, dropped = adapt_state_dict(dst, src.state_dict(), img_size=64)
    assert dropped and all(k.startswith("head.fc.") for k in dropped)
    res = dst.load_state_dict(sd, strict=False)
    assert set(res.missing_keys) == set(dropped) and not res.unexpected_keys
    same = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    sd2, dropped2 = adapt_state_dict(same, src.state_dict(), img_size=32, reset_head=True)
    assert dropped2 == [k for k in src.state_dict() if k.startswith("head.fc.")]
    with pytest.raises(ValueError, match="does not fit"):
        adapt_state_dict(same, {k: v for k, v in src.state_dict().items() if "stages.1" not in k}, img_size=32)
