"""Fine-tuning's source streamed into ZeRO-3 partitions (pipeline.engine.load_init_weights): two gloo
ranks each read only the elements they own from sharded safetensors on the loopback S3 server, and
the engine ends up with exactly the weights the surgery (``adapt_state_dict``) makes from the whole
source: fp32 master partitions bit-equal, bf16 copies their rounding, buffers equal, tables resized,
the new head left as initialised.

On a real cluster the ranks are 8 GPUs per node on many nodes with NCCL; the reads are the same
ranged object-storage reads (one per partition, sized model / world), so a coatnet_7 source is read
once in total instead of once per rank (benchmarks/finetune_init_memory.py measures coatnet_5).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import models
from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RANK = r"""
import json, os, sys
rank, world, port, src, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port)
import torch
torch.set_num_threads(1)
import deepspeed
from safetensors.torch import save_file
from pipeline.config import load_config
from pipeline.engine import build_engine, deepspeed_config, gathered_weights, load_init_weights
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config("configs/demo.yaml", [f"scaling.num_workers={world}", "train.global_batch=8", "train.micro_batch=4",
                  "model.zero_init=true", "model.variant=coatnet_pico", "model.img_size=64",
                  "model.num_classes=5", f"init.from_checkpoint={src}"])
engine, _ = build_engine(cfg, deepspeed_config(cfg))
init = load_init_weights(engine, cfg)
masters = dict(gathered_weights(engine, rank=rank))          # the optimizer's fp32 partitions, gathered
bf16 = {}
for name, p in engine.module.named_parameters():             # what the forward computes with
    with deepspeed.zero.GatheredParameters([p]):
        if rank == 0:
            bf16[name] = p.data.detach().float().clone()
if rank == 0:
    save_file({k: v.contiguous() for k, v in masters.items()}, f"{out}/masters.safetensors")
    save_file(bf16, f"{out}/bf16.safetensors")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"bytes_read": init.bytes_read, "dropped": init.dropped,
               "share": sum(p.ds_tensor.numel() * 4 for p in engine.module.parameters())}, f)
"""


def _source() -> dict[str, torch.Tensor]:
    """A pretrained-looking coatnet_pico at 32 px, 10 classes: every value distinct from an init."""
    torch.manual_seed(1)
    net = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net.state_dict()


@pytest.mark.slow   # two DeepSpeed processes
def test_two_ranks_read_their_partitions_and_get_the_surgery_exactly(tmp_path, s3_endpoint):
    from safetensors.torch import load_file

    from pipeline.weights import adapt_state_dict, weight_files, write_weights

    sd = _source()
    src = f"s3://{s3_endpoint['bucket']}/pretrained/weights"
    write_weights(src, sd.items(), max_shard_bytes=200_000)       # several shards and an index
    assert len(weight_files(src)) > 3
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    port = str(free_port())
    env = {**os.environ, **s3_endpoint["env"], "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, src, str(tmp_path)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]

    expected, dropped = adapt_state_dict(models.create_model("coatnet_pico", num_classes=5, img_size=64),
                                         dict(sd), img_size=64)
    masters, bf16 = load_file(tmp_path / "masters.safetensors"), load_file(tmp_path / "bf16.safetensors")
    assert set(masters) == set(expected) | set(dropped)
    for k, v in expected.items():
        assert torch.equal(masters[k], v.float()), k                          # exact fp32, tables resized
        if k in bf16:
            assert torch.equal(bf16[k], v.bfloat16().float()), k
    assert masters["stages.2.blocks.0.attn.relative_position_bias_table"].shape[-1] == 7  # 32 -> 64 px
    assert sorted(dropped) == ["head.fc.bias", "head.fc.weight"]
    assert masters["head.fc.weight"].shape == (5, sd["head.fc.weight"].shape[1])
    assert masters["head.fc.weight"].abs().mean() < 0.5 * sd["head.fc.weight"].abs().mean()   # an init, not N(0,1)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(sorted(r["dropped"]) == sorted(dropped) for r in ranks)
    total = sum(v.numel() * v.element_size() for k, v in sd.items() if k not in dropped)
    tables = sum(v.numel() * 4 for k, v in sd.items() if k.endswith("relative_position_bias_table"))
    buffers = sum(b.numel() * b.element_size() for b in
                  models.create_model("coatnet_pico", num_classes=10, img_size=32).buffers())
    for r in ranks:       # its own partitions, plus what every rank needs whole (tables, buffers)
        assert r["bytes_read"] <= r["share"] + tables + buffers
        assert r["bytes_read"] < 0.6 * total
    # together the ranks read the body once, not once per rank
    assert sum(r["bytes_read"] for r in ranks) <= total + 2 * (tables + buffers)
