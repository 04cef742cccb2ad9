"""Pieces of the training loop that need no workers: schedule, DeepSpeed config, weight-decay
groups, loss, and the fine-tuning init hook (resize + new head)."""
from __future__ import annotations

import math

import pytest
import torch

import models
from pipeline.weights import adapt_state_dict
from pipeline.config import load_config
from pipeline.engine import deepspeed_config, param_groups
from pipeline.train import loss_fn, lr_at


def test_lr_schedule_warmup_cosine_linear():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup=10, total=110)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(1e-4)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1e-3)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(1e-5)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, schedule="constant", **kw) == 1e-3


def test_deepspeed_config_from_recipe():
    cfg = load_config("configs/demo.yaml", ["deepspeed.offload=cpu", "train.clip_grad=0.5",
                                            "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}}"])
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1 and ds["bf16"] == {"enabled": True}
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["reduce_bucket_size"] == 1000 and ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds        # torch.optim.AdamW is passed in (FusedAdam would JIT-build on CPU)


def test_weight_decay_groups_follow_no_weight_decay():
    model = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skip = model.no_weight_decay()
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)] not in skip for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {n for n in skip if n in dict(model.named_parameters())}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert loss_fn(logits, t, "softmax").item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="sum") / 2
    assert loss_fn(logits, t, "sigmoid").item() == pytest.approx(bce.item())


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


_OFFLOAD_SCRIPT = r"""
import os, sys, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, models
from pipeline.config import load_config
from pipeline.engine import build_optimizer, deepspeed_config
cfg = load_config("configs/demo.yaml", ["scaling.num_workers=1", "train.global_batch=32", "deepspeed.offload=cpu"])
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = models.create_model("coatnet_pico", num_classes=10, img_size=32)
for b in model.buffers():
    if b.is_floating_point():
        b.data = b.data.to(torch.bfloat16)
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model),
                                         config=deepspeed_config(cfg))
print("OPTIMIZER", type(opt.optimizer).__name__)
x, y = torch.randn(32, 3, 32, 32, dtype=torch.bfloat16), torch.randint(0, 10, (32,))
for _ in range(6):
    loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
    engine.backward(loss)
    engine.step()
    print("LOSS", loss.item())
"""


@pytest.mark.slow   # a DeepSpeed process
def test_cpu_offload_engine_steps_with_deepspeed_cpu_adam(tmp_path):
    """ZeRO-Offload refuses torch's AdamW; the trainer must hand DeepSpeed its CPU Adam, and the
    offloaded engine must actually train (run in a subprocess: it owns a process group)."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "offload.py"
    script.write_text(_OFFLOAD_SCRIPT)
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, str(script), str(port)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OPTIMIZER DeepSpeedCPUAdam" in out.stdout
    losses = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("LOSS")]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.9, losses


@pytest.mark.parametrize("offload", ["none", "cpu", "nvme"])
def test_deepspeed_config_is_the_infra_profile_filled_in(offload):
    """One source of ZeRO settings: the trainer's config IS infra/deepspeed/<profile>.json with the
    "auto" batch fields and the typed config's own fields filled in."""
    import json

    from pipeline.engine import PROFILE_DIR, PROFILES

    extra = ["deepspeed.nvme_path=/local_nvme"] if offload == "nvme" else []
    for use_gpu in (True, False):
        cfg = load_config("configs/demo.yaml", [f"deepspeed.offload={offload}", "train.clip_grad=0.5",
                                                f"scaling.use_gpu={str(use_gpu).lower()}", *extra])
        ds = deepspeed_config(cfg)
        profile = json.loads((PROFILE_DIR / PROFILES[offload]).read_text())
        assert "auto" not in json.dumps(ds)
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
            == (64, 32, 1)
        assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
        for key, value in profile["zero_optimization"].items():
            if key == "overlap_comm":
                assert ds["zero_optimization"][key] is (value and use_gpu)   # gloo: no overlap
            elif key.startswith("offload_"):
                got = ds["zero_optimization"][key]
                assert got["device"] == value["device"] and got.get("nvme_path") == value.get("nvme_path")
            else:
                assert ds["zero_optimization"][key] == value, key
        for key in set(profile) - {"_comment", "train_batch_size", "train_micro_batch_size_per_gpu",
                                   "gradient_accumulation_steps", "gradient_clipping", "bf16",
                                   "zero_optimization", "steps_per_print"}:
            assert ds[key] == profile[key], key


_ZERO_INIT_SCRIPT = r"""
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, models, torch
from pipeline.config import load_config
from pipeline.engine import deepspeed_config, param_groups
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config("configs/demo.yaml", ["scaling.num_workers=1", "train.global_batch=32", "model.zero_init=true"])
def split(model):
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    return sorted(names[id(p)] for p in decay["params"]), sorted(names[id(p)] for p in no_decay["params"])
with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg)):
    partitioned = models.create_model("coatnet_pico", num_classes=10, img_size=32)
plain = models.create_model("coatnet_pico", num_classes=10, img_size=32)
print(json.dumps({"partitioned": split(partitioned), "plain": split(plain),
                  "shapes": sorted({tuple(p.shape) for p in partitioned.parameters()})}))
"""


@pytest.mark.slow   # a DeepSpeed process
def test_weight_decay_split_is_the_same_under_zero_init(tmp_path):
    """Under zero.Init every parameter's own shape is empty; decay is decided by the full shape."""
    import json
    import os
    import subprocess
    import sys

    from conftest import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "zero_init.py"
    script.write_text(_ZERO_INIT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(free_port())], cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shapes"] == [[0]]                      # really partitioned: the bug's precondition
    assert res["partitioned"] == res["plain"]
    decay, no_decay = res["plain"]
    assert decay and no_decay and any(n.endswith("relative_position_bias_table") for n in no_decay)


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


def test_latest_checkpoint_never_picks_an_interrupted_save(tmp_path):
    """Without Ray's snapshot (copied folders), the newest COMPLETE checkpoint is resumed from:
    a folder where a kill left only some ranks' files is passed over until it is whole."""
    import json

    from pipeline.checkpoint import STATE_FILE, latest_checkpoint

    def write(step: int, ranks: list[int], world: int = 2) -> None:
        d = tmp_path / f"checkpoint_{step:08d}"
        (d / "ds").mkdir(parents=True, exist_ok=True)
        (d / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world, "format": 2}))
        for r in ranks:
            (d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
            (d / "ds" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")

    assert latest_checkpoint(str(tmp_path)) is None
    write(2, [0, 1])
    write(4, [0])                                   # rank 1 died during the save of step 4
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_00000002")
    (tmp_path / "checkpoint_00000006").mkdir()      # a save that wrote nothing yet
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_00000002")
    write(4, [1])                                   # the re-done save completes it
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_00000004")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000002"}}))
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_00000002")   # Ray's record first
