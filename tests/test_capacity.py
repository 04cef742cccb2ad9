"""The capacity planner (pipeline/capacity.py, jobs/capacity.py) against measurements.

- FLOPs: exactly the model's own counter (models.count_flops on a real CPU model), x2 x3.
- Activations: the meta-device measurement equals a real CPU forward+backward's saved bytes,
  is linear in batch, and checkpointing lowers it.
- ZeRO-3 model states: a MEASURED 2-rank DeepSpeed ZeRO-3 run (gloo, torch AdamW, the bf16
  reference config from infra/) agrees with the planner per component within 20%.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port
import torch

import models
from pipeline import activations
from pipeline import capacity as planner

ROOT = Path(__file__).resolve().parents[1]
TINY = "coatnet_pico" if "coatnet_pico" in models.list_models() else "coatnet_nano"
TINY_RES = 64


def test_flops_equal_the_models_own_counter():
    facts = planner.model_facts(TINY, TINY_RES)
    model = models.create_model(TINY, img_size=TINY_RES)  # a real CPU model
    assert facts.macs_per_image == models.count_flops(model, img_size=TINY_RES, batch_size=1)
    assert facts.params == sum(p.numel() for p in model.parameters())
    assert facts.forward_flops == 2 * facts.macs_per_image
    assert facts.train_flops == 6 * facts.macs_per_image

    inp = planner.PlanInputs(variant=TINY, img_size=TINY_RES, dataset_size=1_281_167, epochs=300,
                             global_batch=4096, gpu="A100-40GB", num_gpus=8, mfu=0.5)
    p = planner.plan(inp)
    assert p.total_flops == 6 * facts.macs_per_image * 1_281_167 * 300
    assert p.seconds == pytest.approx(p.total_flops / (8 * 312e12 * 0.5))
    assert p.images_per_s == pytest.approx(8 * 312e12 * 0.5 / facts.train_flops)
    assert p.mb_per_s == pytest.approx(p.images_per_s * 110e3 / 1e6)
    assert p.decode_cores == pytest.approx(p.images_per_s / inp.decode_images_per_core_s)


def test_flop_counter_agrees_on_meta_and_cpu():
    """The planner counts the largest variants on the meta device; that must equal a real count."""
    assert planner.count_macs("coatnet_0", 224, device="meta") == \
        planner.count_macs("coatnet_0", 224, device="cpu")


def test_meta_activation_measurement_equals_a_real_cpu_run():
    # fp32 here: CPU bf16 kernels are slow, and the claim (meta sees the same saved bytes as a
    # real run) does not depend on the dtype; the planner itself measures in bf16.
    torch.manual_seed(0)
    meta = activations.measure_activations(models.create_model(TINY, img_size=TINY_RES, device="meta"), 4, TINY_RES,
                                       dtype=torch.float32)
    cpu = activations.measure_activations(models.create_model(TINY, img_size=TINY_RES), 4, TINY_RES,
                                      dtype=torch.float32)
    assert cpu.saved_bytes > 0
    assert meta.saved_bytes == pytest.approx(cpu.saved_bytes, rel=0.01)
    assert meta.checkpointed_bytes == pytest.approx(cpu.checkpointed_bytes, rel=0.01)
    # Checkpointing must save memory for a CoAtNet (the early MBConv blocks dominate).
    assert cpu.checkpointed_bytes < 0.8 * cpu.saved_bytes


@pytest.mark.parametrize("variant,preset", [("coatnet_1", "timm"), ("coatnet_6", "paper")])
def test_two_blocks_per_stage_measure_what_the_whole_network_does(variant, preset):
    """The planner measures a copy with two blocks per stage and adds the repeats (coatnet_6: the
    split Transformer stage of C-6/7): exactly the whole network's figures, both with and without
    checkpointing."""
    whole = activations.measure_activations(models.create_model(variant, device="meta", preset=preset), 2, 224)
    short = activations.measure_repeats_once(variant, 2, 224, (("preset", preset),))
    assert (short.saved_bytes, short.checkpointed_bytes) == (whole.saved_bytes, whole.checkpointed_bytes)


def test_activation_model_is_linear_in_batch():
    act = activations.activation_model(TINY, TINY_RES)
    measured = activations.measure_activations(models.create_model(TINY, img_size=TINY_RES, device="meta"), 8, TINY_RES)
    assert act.bytes(8, False) == pytest.approx(measured.saved_bytes, rel=0.02)
    assert act.bytes(8, True) == pytest.approx(measured.checkpointed_bytes, rel=0.05)
    assert act.per_image > 0


def _zero3_rank(rank: int, world: int, port: int, variant: str, img: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    import models as m

    torch.manual_seed(0)
    # bf16 module up front: DeepSpeed's bf16 mode leaves buffers (BatchNorm statistics) in fp32,
    # which CPU batch_norm refuses with bf16 inputs.
    model = m.create_model(variant, num_classes=10, img_size=img).to(torch.bfloat16)
    with open(ROOT / "infra" / "deepspeed" / "zero3_bf16.json") as f:
        cfg = json.load(f)
    cfg.update(train_batch_size=2 * world, train_micro_batch_size_per_gpu=2,
               gradient_accumulation_steps=1)
    deepspeed.init_distributed(dist_backend="gloo")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    x = torch.randn(2, 3, img, img, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (2,))
    loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
    engine.backward(loss)
    engine.step()  # Adam states exist only after the first step

    def nbytes(t):
        return t.numel() * t.element_size()

    params = list(engine.module.parameters())
    queue.put({
        "rank": rank,
        "params": sum(nbytes(p.ds_tensor) for p in params)
        + sum(nbytes(p.data) for p in params if getattr(p, "ds_persist", False)),
        "grads": nbytes(zopt.grad_partitions_flat_buffer),
        "master": sum(nbytes(t) for t in zopt.fp32_partitioned_groups_flat),
        "optimizer": sum(nbytes(v) for s in zopt.optimizer.state.values() for v in s.values()
                         if torch.is_tensor(v) and v.dim() > 0),
    })


@pytest.mark.slow   # two DeepSpeed processes
def test_zero3_memory_model_matches_a_measured_two_rank_run():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_zero3_rank, args=(r, 2, port, TINY, TINY_RES, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)

    with open(ROOT / "infra" / "deepspeed" / "zero3_bf16.json") as f:
        zero = planner.ZeroSettings.from_deepspeed_config(json.load(f))
    model = models.create_model(TINY, num_classes=10, img_size=TINY_RES)
    numels = [p.numel() for p in model.parameters()]
    predicted = planner.zero3_model_states(
        sum(numels), sum(n for n in numels if n <= zero.param_persistence_threshold), world_size=2)
    for r in results:
        for key in ("params", "grads", "master", "optimizer"):
            assert r[key] == pytest.approx(predicted[key], rel=0.20), (key, r, predicted)
        assert sum(r[k] for k in predicted) == pytest.approx(sum(predicted.values()), rel=0.20)


def test_offload_moves_optimizer_states_off_the_gpu():
    facts = planner.model_facts("coatnet_0", 224)
    act = activations.activation_model("coatnet_0", 224)
    on_gpu = planner.zero3_memory(facts, 8, 32, act, planner.ZeroSettings(offload="none"))
    cpu = planner.zero3_memory(facts, 8, 32, act, planner.ZeroSettings(offload="cpu"))
    nvme = planner.zero3_memory(facts, 8, 32, act, planner.ZeroSettings(offload="nvme"))
    assert on_gpu.model_states == pytest.approx(16 * facts.params / 8 + 2 * facts.persistent_params,
                                                rel=1e-3)
    assert cpu.master == cpu.optimizer == cpu.grads == 0
    assert cpu.total < on_gpu.total
    # 8 ranks on a node each offload fp32 master + Adam (12 B) + bf16 grads/params (4 B) per param / 8.
    assert cpu.host_per_node >= 16 * facts.params
    assert nvme.nvme_per_node == cpu.host_per_node and nvme.host_per_node < cpu.host_per_node


def test_smallest_gpu_count_is_the_first_that_fits():
    inp = planner.PlanInputs(variant="coatnet_0", img_size=224, global_batch=4096, gpu="L4",
                             num_gpus=8, min_micro_batch=512)
    p = planner.plan(inp)
    counts = planner.gpu_counts(inp.gpus_per_node)
    assert p.min_gpus is not None and p.min_gpus > 1
    facts, act = p.facts, activations.activation_model("coatnet_0", 224)
    zero = planner.ZeroSettings()
    assert planner.choose_micro_batch(facts, act, inp, p.min_gpus, zero)[0] is not None
    previous = counts[counts.index(p.min_gpus) - 1]
    assert planner.choose_micro_batch(facts, act, inp, previous, zero)[0] is None
    # Checkpointing lets the same micro-batch fit on fewer GPUs.
    ck = planner.plan(planner.PlanInputs(**{**inp.__dict__, "checkpointing": True}))
    assert ck.min_gpus < p.min_gpus


def test_paper_compute_is_consistent_with_our_flop_count():
    for row in planner.paper_check():
        # The paper's core-days must cover our FLOPs at a plausible utilisation: a FLOPs-vs-MACs
        # slip (x2) or a wrong step factor would push this outside the band.
        assert 0.15 < row.implied_mfu < 0.75, row


def test_cli_help_and_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    h = subprocess.run([sys.executable, "jobs/capacity.py", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "--num-gpus" in h.stdout and "--offload" in h.stdout
    r = subprocess.run([sys.executable, "jobs/capacity.py", "--variant", TINY, "--img-size", str(TINY_RES),
                        "--dataset", "imagenet-1k", "--epochs", "300", "--gpu", "A100-40GB",
                        "--num-gpus", "8", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and out["min_gpus"] >= 1
    assert out["total_flops"] == 6 * out["facts"]["macs_per_image"] * 1_281_167 * 300
    # A recipe supplies the run's settings (through pipeline.config), flags override them.
    c = subprocess.run([sys.executable, "jobs/capacity.py", "--config", "configs/coatnet_0_imagenet1k.yaml",
                        "--dataset", "imagenet-1k", "--num-gpus", "16", "--variant", TINY,
                        "--img-size", str(TINY_RES), "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr
    from pipeline.config import load_config

    recipe = load_config(str(ROOT / "configs" / "coatnet_0_imagenet1k.yaml"))
    got = json.loads(c.stdout)["inputs"]
    assert (got["global_batch"], got["epochs"], got["offload"]) == (
        recipe.train.global_batch, recipe.train.epochs, recipe.deepspeed.offload)
    assert (got["variant"], got["img_size"], got["num_gpus"]) == (TINY, TINY_RES, 16)
    t = subprocess.run([sys.executable, "jobs/capacity.py", "--variant", TINY, "--img-size", str(TINY_RES),
                        "--gpu", "H100-SXM"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert t.returncode == 0, t.stderr
    for row in ("forward MACs / image", "total compute", "activations (measured)",
                "smallest GPU count", "read rate", "decode + augment"):
        assert row in t.stdout
