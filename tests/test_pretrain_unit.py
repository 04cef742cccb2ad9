"""Pieces of the training loop that need no workers: schedule, DeepSpeed config, weight-decay
groups, loss, and the fine-tuning init hook (resize + new head)."""
from __future__ import annotations

import math

import pytest
import torch

import models
from pipeline.checkpoint import adapt_state_dict
from pipeline.config import load_config
from pipeline.train import deepspeed_config, loss_fn, lr_at, param_groups


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
from pipeline.train import build_optimizer, deepspeed_config
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
