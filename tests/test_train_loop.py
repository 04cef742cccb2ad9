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
    """Ray Train may hand the loop fewer (or more) workers than configured: the global and micro
    batch stay, accumulation absorbs the change; a world that cannot split the batch is one clear error."""
    cfg = load_config("configs/demo.yaml", ["train.global_batch=96", "train.micro_batch=16", "scaling.num_workers=3"])
    assert cfg.train.grad_accum == 2
    for world, accum in ((1, 6), (2, 3), (3, 2), (6, 1)):
        fitted = fit_batch_to_world(cfg, world)
        t = fitted.train
        assert (t.global_batch, t.micro_batch, t.grad_accum, fitted.scaling.num_workers) == (96, 16, accum, world)
    assert fit_batch_to_world(cfg, 3) is cfg                   # the configured world: unchanged
    with pytest.raises(PipelineError, match=r"cannot be kept on 4 workers.*divisor of 24"):
        fit_batch_to_world(cfg, 4)
