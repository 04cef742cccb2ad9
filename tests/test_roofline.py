"""The per-op-type roofline (pipeline/roofline.py) and the planner's MFU (pipeline/capacity.py).

The roofline is read from the model (a meta-device forward under a dispatch mode); the GPU kit's
analytic model (../shared/gpu/roofline.py, written per layer by hand) gives reference ceilings on an
H200 (790 TFLOP/s measured matmul, 4.3 TB/s measured copy, 67 TFLOP/s fp32 for depthwise):
coatnet_0 6,394 img/s at batch 256 (22.1% of 790), coatnet_3 1,661 img/s at batch 128 (46.0%).
Both models make the same kernel and fusion assumptions, so they must agree within 2%.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models
from pipeline import capacity as planner
from pipeline import roofline

ROOT = Path(__file__).resolve().parents[1]
H200 = dict(matmul_flops=790e12, fp32_flops=67e12, bandwidth=4.3e12)
KIT = {"coatnet_0": (256, 6394, 0.221, 629), "coatnet_3": (128, 1661, 0.460, 1864)}


@pytest.mark.parametrize("variant", sorted(KIT))
def test_roofline_matches_the_kits_ceilings(variant):
    batch, img_s, mfu_790, mb = KIT[variant]
    rl = roofline.op_roofline(variant, 224)
    assert rl.images_per_s(batch, **H200) == pytest.approx(img_s, rel=0.02)
    assert rl.mfu(batch, **H200, peak=790e12) == pytest.approx(mfu_790, abs=0.005)
    assert rl.bytes_per_image / 1e6 == pytest.approx(mb, rel=0.02)


def test_roofline_flops_are_the_models_own():
    rl = roofline.op_roofline("coatnet_0", 224)
    macs = models.count_flops(models.create_model("coatnet_0", device="meta"))
    assert rl.model_flops == 6 * macs
    counted = sum(k[2] for k in rl.kernels)
    # every GEMM's backward is 2 x its forward except the stem's first conv (no input gradient)
    stem1 = 2 * 112 * 112 * 27 * 64
    assert counted == pytest.approx(6 * macs - stem1, rel=1e-6)


def test_mbconv_stages_are_memory_bound_and_norms_a_third_to_a_half():
    for variant, (batch, *_rest) in KIT.items():
        rl = roofline.op_roofline(variant, 224)
        by_type = rl.by("type", **H200)
        by_stage = rl.by("stage", **H200)
        total = sum(v[2] for v in by_type.values())
        norm_share = by_type[roofline.NORM][2] / total
        assert 0.30 < norm_share < 0.45, (variant, norm_share)
        for stage in ("S1", "S2"):
            gflop, mb, _ = by_stage[stage]
            assert gflop * 1e9 / (mb * 1e6) < 790e12 / 4.3e12   # below the ridge point: memory-bound


def test_roofline_follows_resolution_and_form():
    base = roofline.op_roofline("coatnet_0", 224)
    big = roofline.op_roofline("coatnet_0", 384)
    paper = roofline.op_roofline("coatnet_0", 224, (("preset", "paper"),))
    assert big.bytes_per_image / base.bytes_per_image == pytest.approx((384 / 224) ** 2, rel=0.08)
    assert big.model_flops > 2.9 * base.model_flops          # attention grows faster than the pixels
    assert paper.model_flops < base.model_flops              # Eq. 5: stride on the expand conv


def test_planner_mfu_is_modelled_below_the_flat_40_percent():
    for variant in KIT:
        m = planner.default_mfu(variant, 224, "H200", batch=KIT[variant][0])
        rl = roofline.op_roofline(variant, 224)
        g = planner.GPUS["H200"]
        ceiling = rl.mfu(KIT[variant][0], g.matmul_flops, g.fp32_flops, g.bandwidth, peak=g.peak_bf16_flops)
        assert m.source == "modelled"
        assert m.ceiling == pytest.approx(ceiling)
        assert m.value == pytest.approx(planner.ROOFLINE_EFFICIENCY * ceiling)
        assert m.value < 0.40
    # of the datasheet 989 TFLOP/s: the kit's 22% / 46% of 790 are 17.6% / 36.7%
    assert planner.default_mfu("coatnet_0", 224, "H200", batch=256).ceiling == pytest.approx(0.176, abs=0.005)
    assert planner.default_mfu("coatnet_3", 224, "H200", batch=128).ceiling == pytest.approx(0.367, abs=0.005)
    # an H100 has 70% of an H200's bandwidth: the memory-bound coatnet_0 loses more than coatnet_3
    h100 = {v: planner.default_mfu(v, 224, "H100-SXM").value / planner.default_mfu(v, 224, "H200").value
            for v in KIT}
    assert h100["coatnet_0"] < h100["coatnet_3"] < 1.0


def test_planner_prefers_a_measured_mfu_and_says_which():
    inp = planner.PlanInputs(variant="coatnet_0", img_size=224, gpu="H200", num_gpus=8,
                             dataset_size=1_281_167, epochs=300)
    modelled = planner.plan(inp)
    assert modelled.mfu.source == "modelled"
    assert modelled.seconds == pytest.approx(
        modelled.total_flops / (8 * 989e12 * modelled.mfu.value))
    table = {("coatnet_0", 224, "H200", ()): planner.MeasuredMFU(0.15, 5900.0, "RESULTS.md test row")}
    measured = planner.default_mfu("coatnet_0", 224, "H200", measured=table)
    assert (measured.value, measured.source) == (0.15, "measured")
    assert measured.ceiling == pytest.approx(modelled.mfu.ceiling, rel=0.02)   # plan: optimizer over 8 ranks
    assert planner.default_mfu("coatnet_0", 384, "H200", measured=table).source == "modelled"
    given = planner.plan(planner.PlanInputs(**{**inp.__dict__, "mfu": 0.4}))
    assert given.mfu.source == "given"
    assert modelled.gpu_hours / given.gpu_hours == pytest.approx(0.4 / modelled.mfu.value)
    text = planner.format_plan(modelled)
    assert "modelled" in text and "roofline ceiling" in text
    assert "| norm+act |" in planner.format_roofline(modelled)


def test_cli_reports_the_mfu_source():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "jobs/capacity.py", "--variant", "coatnet_0", "--gpu", "H200",
                        "--num-gpus", "8", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mfu"]["source"] == "modelled" and 0.1 < out["mfu"]["value"] < 0.2
    assert out["inputs"]["mfu"] is None


def test_optimizer_traffic_is_shared_by_zero3_ranks():
    rl = roofline.op_roofline("coatnet_3", 224)
    assert rl.optimizer_bytes() == 40 * rl.params                     # one GPU: the kit's 40 B/param
    assert rl.optimizer_bytes(shards=64) == pytest.approx((16 + 24 / 64) * rl.params)
    one, many = (rl.images_per_s(16, **H200, shards=s) for s in (1, 64))
    assert many > one                                                 # small micro-batches gain most
    inp = planner.PlanInputs(variant="coatnet_3", img_size=224, gpu="H200", num_gpus=64, global_batch=4096)
    p = planner.plan(inp)
    g = planner.GPUS["H200"]
    assert p.mfu.ceiling == pytest.approx(rl.mfu(p.micro_batch, g.matmul_flops, g.fp32_flops, g.bandwidth,
                                                 peak=g.peak_bf16_flops, shards=64 * p.grad_accum))
