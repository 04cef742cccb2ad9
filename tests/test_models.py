"""Tests of the models package: sizes against the paper, timm equivalence, resizing, training, API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.relpos import relative_position_index, resize_table

# Paper, Tables 3/11/12 (C-6: 1.34B, what its own layer table gives; see models/README.md).
PAPER_PARAMS = {"coatnet_0": 25e6, "coatnet_1": 42e6, "coatnet_2": 75e6, "coatnet_3": 168e6, "coatnet_4": 275e6,
                "coatnet_5": 688e6, "coatnet_6": 1.34e9, "coatnet_7": 2.44e9}
# MACs at 224 px. Table 9 (strided depthwise conv, our default = timm) and main text (Eq. 5 preset).
TABLE9_MACS = {"coatnet_0": 4.6e9, "coatnet_1": 8.8e9, "coatnet_2": 16.6e9}
MAIN_TEXT_MACS = {"coatnet_0": 4.2e9, "coatnet_1": 8.4e9, "coatnet_2": 15.7e9, "coatnet_3": 34.7e9}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The 2-core machine is shared: with more busy threads than cores, OpenMP spin-waiting makes
    multi-threaded small ops 10-50x slower, so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meta_model(name: str, **kwargs) -> models.CoAtNet:
    with torch.device("meta"):
        return models.create_model(name, **kwargs)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_count_matches_paper(name: str) -> None:
    model = _meta_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PAPER_PARAMS[name] - 1) < 0.01, f"{name}: {count / 1e6:.2f}M vs paper {PAPER_PARAMS[name] / 1e6}M"


def test_tiny_variants_are_tiny() -> None:
    for name in ("coatnet_pico", "coatnet_nano"):
        assert sum(p.numel() for p in _meta_model(name, num_classes=10).parameters()) < 2e6


@pytest.mark.parametrize("name", sorted(TABLE9_MACS))
def test_flops_default_match_table9(name: str) -> None:
    macs = models.count_flops(_meta_model(name))
    assert abs(macs / TABLE9_MACS[name] - 1) < 0.05, f"{name}: {macs / 1e9:.2f} GMACs"


@pytest.mark.parametrize("name", sorted(MAIN_TEXT_MACS))
def test_flops_paper_preset_match_main_text(name: str) -> None:
    macs = models.count_flops(_meta_model(name, preset="paper"))
    assert abs(macs / MAIN_TEXT_MACS[name] - 1) < 0.05, f"{name}: {macs / 1e9:.2f} GMACs"


def test_flops_scale_with_batch_and_size() -> None:
    model = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    one = models.count_flops(model)
    assert models.count_flops(model, batch_size=3) == 3 * one
    assert models.count_flops(model, img_size=64) > 3 * one  # attention grows faster than 4x


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights and BN statistics, so that a wrong mapping cannot hide."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        for name, buffer in module.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)


@pytest.mark.parametrize("name,size", [("coatnet_0", 64), ("coatnet_1", (64, 96))])
def test_timm_equivalence_and_round_trip(name: str, size) -> None:
    timm = pytest.importorskip("timm")  # a dev dependency; installed in the project venv
    torch.manual_seed(0)
    reference = timm.create_model(f"{name}_224", img_size=size).eval()
    _randomise(reference)
    ours = models.create_model(name, img_size=size).eval()
    ours.load_state_dict(models.from_timm_state_dict(reference.state_dict(), img_size=size), strict=True)
    hw = (size, size) if isinstance(size, int) else size
    images = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    rel_error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel_error < 1e-4, rel_error

    back = timm.create_model(f"{name}_224", img_size=size).eval()
    back.load_state_dict(models.to_timm_state_dict(ours.state_dict()), strict=True)
    with torch.no_grad():
        assert torch.allclose(back(images), expected, rtol=0, atol=1e-6)


def test_relative_index_addresses_paper_offsets() -> None:
    grid = (3, 4)
    table = torch.randn(2, 5, 7)
    bias = table.flatten(1)[:, relative_position_index(grid)].view(2, 12, 12)
    for q in range(12):
        for k in range(12):
            (i, j), (i2, j2) = divmod(q, 4), divmod(k, 4)
            assert torch.equal(bias[:, q, k], table[:, i - i2 + 2, j - j2 + 3])


def _train_steps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_resize_after_training_gives_finite_logits() -> None:
    torch.manual_seed(0)
    small = models.create_model("coatnet_pico", num_classes=10, img_size=32)
    _train_steps(small, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), steps=3)
    state = small.state_dict()
    resized = models.resize_state_dict(state, 64)
    large = models.create_model("coatnet_pico", num_classes=10, img_size=64)
    large.load_state_dict(resized, strict=True)
    key = "stages.2.blocks.0.attn.relative_position_bias_table"
    assert state[key].shape[-2:] == (3, 3) and resized[key].shape[-2:] == (7, 7)
    expected = F.interpolate(state[key][None], size=(7, 7), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(resized[key], expected)
    assert not torch.equal(resized[key], resize_table(state[key], (4, 4), "nearest"))
    large.eval()
    with torch.no_grad():
        logits = large(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # non-square target
    wide = models.resize_state_dict(state, (64, 96))
    assert wide[key].shape[-2:] == (7, 11)


def test_resize_is_identity_at_equal_size() -> None:
    state = models.create_model("coatnet_pico", num_classes=10, img_size=64).state_dict()
    same = models.resize_state_dict(state, 64)
    assert same.keys() == state.keys()
    assert all(torch.equal(same[k], state[k]) for k in state)


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    # 64 px: at 32 px the last stage is a single token and its bias table cannot matter
    model = models.create_model("coatnet_pico", num_classes=10, img_size=64, drop_path_rate=0.0)
    F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.arange(4)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_tiny_model_overfits_a_small_batch() -> None:
    torch.manual_seed(0)
    model = models.create_model("coatnet_pico", num_classes=10, img_size=32, drop_path_rate=0.0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    losses = _train_steps(model, images, labels, steps=30)
    assert losses[-1] < 0.5 * losses[0], losses


def test_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = models.create_model("coatnet_pico", num_classes=10, img_size=32, drop_path_rate=0.0)
    checkpointed = models.create_model("coatnet_pico", num_classes=10, img_size=32, drop_path_rate=0.0,
                                       grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    for model in (plain, checkpointed):
        F.cross_entropy(model(images), labels).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_stochastic_depth_rises_linearly() -> None:
    model = models.create_model("coatnet_0", img_size=32, drop_path_rate=0.4)
    rates = [m.rate for m in model.modules() if isinstance(m, models.coatnet.DropPath)]
    # one DropPath per MBConv block, two per Transformer block; 12 blocks, 0 -> 0.4
    block_rates = [rates[i] for i in (0, 1, 2, 3, 4)] + rates[5::2]
    assert block_rates[0] == 0.0 and block_rates[-1] == pytest.approx(0.4)
    assert all(b > a for a, b in zip(block_rates, block_rates[1:]))
    assert models.create_model("coatnet_pico").drop_path_rate == 0.0
    assert models.create_model("coatnet_3", img_size=32).drop_path_rate == 0.7  # Table 10


def test_stochastic_depth_endpoint_of_the_reference() -> None:
    """The TF reference (MaxViT's _adjust_survival_rate): block i of L drops at rate x i / L, so
    the last block gets rate x (L-1)/L; the paper preset uses it, timm's form reaches the rate."""
    model = models.create_model("coatnet_0", img_size=32, drop_path_rate=0.4, preset="paper")
    rates = [m.rate for m in model.modules() if isinstance(m, models.coatnet.DropPath)]
    block_rates = [rates[i] for i in (0, 1, 2, 3, 4)] + rates[5::2]
    assert block_rates == pytest.approx([0.4 * i / 12 for i in range(12)])
    assert block_rates[-1] == pytest.approx(0.4 * 11 / 12)
    timm_form = models.create_model("coatnet_0", img_size=32, drop_path_rate=0.4, drop_path_schedule="linear",
                                    preset="paper")
    assert [m.rate for m in timm_form.modules() if isinstance(m, models.coatnet.DropPath)][-1] == pytest.approx(0.4)


def test_batchnorm_eps_and_momentum_reach_every_batchnorm() -> None:
    model = models.create_model("coatnet_pico", img_size=32, bn_eps=1e-3, bn_momentum=0.01)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 1 + 3 * 2 and all((m.eps, m.momentum) == (1e-3, 0.01) for m in norms)
    assert all((m.eps, m.momentum) == (1e-5, 0.1) for m in models.create_model("coatnet_pico", img_size=32).modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="bn_momentum"):
        models.create_model("coatnet_pico", bn_momentum=0.99 + 0.01)


def test_api_attributes_and_head_reset() -> None:
    model = models.create_model("coatnet_nano", num_classes=7, img_size=(32, 64))
    assert model.img_size == (32, 64) and model.num_classes == 7
    assert model.config.name == "coatnet_nano"
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(2, 3, 32, 64)).shape == (2, 3)
    exempt = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert "stages.2.blocks.0.attn.relative_position_bias_table" in exempt
    assert "stages.0.blocks.0.pre_norm.weight" in exempt and "head.fc.bias" in exempt
    assert "stages.2.blocks.0.attn.qkv.weight" not in exempt and "stem.conv1.weight" not in exempt
    assert all(names[n].ndim <= 1 or "table" in n for n in exempt)
    assert "coatnet_0" in models.list_models() and "coatnet_7" in models.list_models()


def test_relative_index_is_not_persistent() -> None:
    state = models.create_model("coatnet_pico", img_size=32).state_dict()
    assert not any("relative_position_index" in k for k in state)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="coatnet_99"), "coatnet_0"),
    (dict(name="coatnet_pico", img_size=48), "divisible by 32"),
    (dict(name="coatnet_pico", img_size=(64, 40)), "divisible by 32"),
    (dict(name="coatnet_pico", num_classes=0), "num_classes"),
    (dict(name="coatnet_pico", pool="median"), "pool"),
    (dict(name="coatnet_pico", not_a_field=1), "not_a_field"),
    (dict(name="coatnet_pico", preset="fancy"), "paper"),
])
def test_bad_arguments_raise_helpful_value_errors(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.create_model(**kwargs)


def test_paper_preset_options() -> None:
    config = models.get_config("coatnet_5", preset="paper")
    assert (config.stride_mode, config.pool, config.dim_head) == ("expand", "max", 64)
    model = models.create_model("coatnet_pico", num_classes=10, img_size=64, preset="paper")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
