"""Pieces of the worker loop (pipeline.train) that need no workers: the learning-rate schedule, the
losses, and fitting the batch to the world an elastic group came back with."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.train import fit_batch_to_world, loss_fn, lr_at


def test_lr_schedule_warmup_cosine_linear():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup=10, total=110)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(1e-4)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1e-3)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(1e-5)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, schedule="constant", **kw) == 1e-3


def test_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert loss_fn(logits, t, "softmax").item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="sum") / 2
    assert loss_fn(logits, t, "sigmoid").item() == pytest.approx(bce.item())


def test_an_elastic_group_keeps_the_global_batch_and_moves_accumulation():
    """Ray Train may hand the loop fewer (or more) workers than configured: the global batch stays,
    accumulation absorbs the change, and the micro-batch shrinks only when it must (to the largest
    divisor of the per-rank batch); a world that cannot split the batch is one clear error."""
    cfg = load_config("configs/demo.yaml", ["train.global_batch=96", "train.micro_batch=16", "scaling.num_workers=3"])
    assert cfg.train.grad_accum == 2
    for world, micro, accum in ((1, 16, 6), (2, 16, 3), (6, 16, 1), (4, 12, 2), (8, 12, 1), (32, 3, 1)):
        fitted = fit_batch_to_world(cfg, world)
        t = fitted.train
        assert (t.global_batch, t.micro_batch, t.grad_accum, fitted.scaling.num_workers) == (96, micro, accum, world)
        assert t.micro_batch * t.grad_accum * world == 96
    assert fit_batch_to_world(cfg, 3) is cfg                   # the configured world: unchanged
    with pytest.raises(PipelineError, match=r"cannot be split evenly over 5 workers"):
        fit_batch_to_world(cfg, 5)


def test_elastic_counts_keep_the_batch_and_the_policy_rounds_down(tmp_path):
    """scaling.min_workers: the counts a run may use divide the global batch; Ray's count of what
    the resources hold is rounded down to one of them (below the smallest: wait, a count of 0)."""
    from ray.train import ScalingConfig

    from pipeline.elastic import allowed_counts, make_policy

    assert allowed_counts(4096, 32, 64) == [32, 64]
    assert allowed_counts(4032, 48, 64) == [48, 56, 63, 64]
    policy = make_policy(ScalingConfig(num_workers=(32, 64)), counts=allowed_counts(4096, 32, 64), key="k")
    policy._live_capacity = lambda: 64          # what ray.nodes() says is alive (no Ray in this test)
    per_node = {f"node{i}": {"CPU": 8.0} for i in range(8)}                # 8 nodes of 8 CPU workers
    assert policy._count_possible_workers(per_node) == 64
    del per_node["node3"]                                                 # a node gone: 56 -> 32
    assert policy._count_possible_workers(per_node) == 32
    assert policy._count_possible_workers({"node0": {"CPU": 31.0}}) == 0  # below the smallest: wait


@pytest.fixture
def group_on_meta():
    """A 2-rank process group whose only backend serves the meta device, as NCCL on GPU workers
    serves only cuda: a collective on a CPU tensor fails there exactly as it does on a GPU node
    ("No backend type associated with device type cpu"). torch's fake backend moves no data."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("meta:fake", store=FakeStore(), rank=0, world_size=2)
    yield torch.device("meta")
    dist.destroy_process_group()


def test_the_loops_reductions_run_on_the_training_device(group_on_meta):
    import torch.distributed as dist

    from pipeline.evaluate import Scores
    from pipeline.train import reduce_sum

    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(2))                     # what a host-side reduction meets on a GPU node
    loss_window = torch.zeros((), device=group_on_meta)
    summed = reduce_sum([loss_window, 3, 12.0], group_on_meta)   # log step: loss, skipped, a source's draws
    assert summed.device == group_on_meta and summed.shape == (3,)
    scores = Scores("single")
    scores.update(torch.zeros(4, 10, device=group_on_meta), torch.zeros(4, dtype=torch.long, device=group_on_meta))
    scores.all_reduce(group_on_meta)                        # the evaluation's sums, on the device too
    assert scores.sums.device == group_on_meta


def test_reductions_sum_over_ranks_on_cpu_workers():
    """The same helper on a real (1-rank) gloo group: values in, sums out, in order."""
    import torch.distributed as dist

    from helpers import free_port
    from pipeline.train import reduce_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert reduce_sum([torch.tensor(1.5), 2, 3.25], torch.device("cpu")).tolist() == [1.5, 2.0, 3.25]
    finally:
        dist.destroy_process_group()
