"""DeepSpeed from the typed config (pipeline.engine): the config is the infra profile filled in,
weight decay grouped by full shape (also under zero.Init), and ZeRO-Offload stepping with
DeepSpeed's CPU Adam (the last two in a DeepSpeed process of their own)."""
from __future__ import annotations

import pytest

import models
from pipeline.config import load_config
from pipeline.engine import deepspeed_config, param_groups


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


def test_weight_decay_groups_follow_no_weight_decay():
    model = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skip = model.no_weight_decay()
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)] not in skip for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {n for n in skip if n in dict(model.named_parameters())}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


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
linear = torch.nn.functional.linear
with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg)):
    partitioned = models.create_model("coatnet_pico", num_classes=10, img_size=32)
plain = models.create_model("coatnet_pico", num_classes=10, img_size=32)
print(json.dumps({"partitioned": split(partitioned), "plain": split(plain),
                  "linear_kept": torch.nn.functional.linear is linear,
                  "shapes": sorted({tuple(p.shape) for p in partitioned.parameters()})}))
"""


@pytest.mark.slow   # a DeepSpeed process
def test_weight_decay_split_is_the_same_under_zero_init(tmp_path):
    """Under zero.Init every parameter's own shape is empty; decay is decided by the full shape."""
    import json
    import os
    import subprocess
    import sys

    from helpers import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "zero_init.py"
    script.write_text(_ZERO_INIT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(free_port())], cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shapes"] == [[0]]                      # really partitioned: the bug's precondition
    # memory_efficient_linear off (infra profiles): zero.Init would otherwise replace F.linear for
    # the whole process with an autograd.Function of its own, inside every compiled block
    assert res["linear_kept"]
    assert res["partitioned"] == res["plain"]
    decay, no_decay = res["plain"]
    assert decay and no_decay and any(n.endswith("relative_position_bias_table") for n in no_decay)


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

    from helpers import free_port

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
