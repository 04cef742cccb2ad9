"""torch.compile under DeepSpeed ZeRO-3 (pipeline.engine.compile_engine), on CPU, one rank (gloo),
bf16: the graph breaks dynamo counts, and that the compiled step computes what the eager one does.

- ``engine``: DeepSpeed's ``engine.compile()``; ZeRO-3's ``torch.compiler.disable``'d hooks on every
  submodule break the graph at each (the review counted 169 for coatnet_0 on a GPU).
- ``blocks``: the MBConv/Transformer blocks and the head are ZeRO-3 leaf modules, each block's
  ``forward`` is compiled: no hook inside a graph, no graph break, one graph per block shape.
- ``blocks`` with FlexAttention and bf16 weights: the bias tables train through the captured fp32
  table (no CPU flex backward in PyTorch: its guard lifted, flex's dense backward runs).
Backends ``eager`` / ``aot_eager`` (AOTAutograd's joint graph: the compiled backward runs against
parameters ZeRO-3 released and re-gathered); inductor is the GPU's (benchmarks/zero3_step.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
import torch.nn.attention.flex_attention as flex_module
from deepspeed.utils import safe_get_full_grad
from torch._dynamo.utils import counters
from pipeline import engine as E
from pipeline.config import load_config

torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
flex_module._validate_device = lambda *args: None      # flex's dense backward on CPU (see docstring)

def run(mode, backend, attn):
    torch._dynamo.reset(); counters.clear(); torch.manual_seed(0)
    cfg = load_config(None, ["model.variant=coatnet_pico", "model.img_size=64", "model.num_classes=10",
                             f"model.attn_backend={attn}", "model.drop_path_rate=0.0", "train.global_batch=2",
                             "train.micro_batch=2", "train.steps=3", "scaling.num_workers=1",
                             "scaling.use_gpu=false", "model.compile=false"])
    ds = E.deepspeed_config(cfg)
    model = E.build_model(cfg, ds)
    opt = E.build_optimizer(cfg, model)
    E.fp32_batchnorm_stats(model)
    leaves = E.mark_leaf_blocks(model) if mode == "blocks" else 0
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    if mode != "eager":
        E.compile_engine(engine, mode, backend=backend)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 64, 64, generator=g).bfloat16(), torch.tensor([1, 7])
    losses, tables = [], {}
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        if step == 0:
            for n, p in engine.module.named_parameters():
                if n.endswith("relative_position_bias_table"):
                    tables[n] = safe_get_full_grad(p).float().norm().item()
        engine.step()
        losses.append(loss.item())
    print("RESULT " + json.dumps(dict(mode=mode, backend=backend, attn=attn, losses=losses, tables=tables,
        leaves=leaves, blocks=len(engine.module.blocks()), graph_breaks=sum(counters["graph_break"].values()),
        unique_graphs=counters["stats"].get("unique_graphs", 0))), flush=True)

for mode, backend, attn in [("eager", None, "sdpa"), ("engine", "eager", "sdpa"),
                            ("blocks", "aot_eager", "sdpa"), ("blocks", "aot_eager", "flex")]:
    run(mode, backend, attn)
"""


@pytest.mark.slow   # a DeepSpeed process; ~1 minute on 2 cores
def test_leaf_blocks_compile_without_graph_breaks_and_train_as_eager(tmp_path):
    from helpers import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "zero3_compile.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(free_port())], cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    eager, engine, blocks, flex = runs
    # DeepSpeed's engine.compile(): at least one break per block (ZeRO-3's hooks on every module)
    assert engine["graph_breaks"] > eager["blocks"], engine
    # leaf blocks compiled one by one: no break; a graph per block shape, at most one per leaf
    assert blocks["graph_breaks"] == 0 and flex["graph_breaks"] == 0, (blocks, flex)
    assert blocks["leaves"] == blocks["blocks"] - 1          # every block but the stem
    assert 0 < blocks["unique_graphs"] <= blocks["leaves"]
    for run in (engine, blocks):
        assert run["losses"] == pytest.approx(eager["losses"], rel=2e-3), run
        assert run["tables"].keys() == eager["tables"].keys()
        for name, norm in eager["tables"].items():
            assert norm > 0 and run["tables"][name] == pytest.approx(norm, rel=2e-2), (name, run)
    # FlexAttention under ZeRO-3 with bf16 tables: the same function, the tables get their gradient
    assert flex["losses"] == pytest.approx(eager["losses"], rel=2e-2), flex
    for name, norm in eager["tables"].items():
        assert flex["tables"][name] == pytest.approx(norm, rel=5e-2), (name, flex)
