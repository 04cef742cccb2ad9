"""Attention backends, init from the meta device, table resizing, per-block compile (CPU only)."""

from __future__ import annotations

import pytest
import torch

import models
from models.coatnet import RelativeAttention, resolve_attn_backend
from models.relpos import relative_position_index


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded, as in test_models.py: the 2-core machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRID = (4, 3)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _attention_grads(attn: RelativeAttention, x: torch.Tensor, index: torch.Tensor, forward=None):
    """Output and the gradients of the input, the qkv weight and the bias table."""
    x = x.detach().requires_grad_()
    attn.zero_grad(set_to_none=True)
    out = (attn if forward is None else forward)(x, index)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a non-uniform output grad
    return out.detach(), x.grad, attn.qkv.weight.grad, attn.relative_position_bias_table.grad


def _reference_attention() -> tuple[RelativeAttention, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    attn = RelativeAttention(16, 32, 8, GRID, attn_backend="math")
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)  # a bias large enough to matter
    return attn, torch.randn(2, GRID[0] * GRID[1], 16), relative_position_index(GRID)


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_sdpa_backends_equal_math_reference_with_gradients(backend: str) -> None:
    attn, x, index = _reference_attention()
    expected = _attention_grads(attn, x, index)
    attn.attn_backend = backend
    for name, want, got in zip(("out", "input grad", "qkv grad", "table grad"), expected,
                               _attention_grads(attn, x, index)):
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (name, (got - want).abs().max())


def test_flex_backend_equals_math_reference_with_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch has no flex_attention backward on CPU (it raises before tracing). The score_mod's
    gradients are checked through flex's reference (dense) implementation: the CPU guard lifted,
    traced with the aot_eager backend; eager forward is checked as PyTorch ships it."""
    flex_module = pytest.importorskip("torch.nn.attention.flex_attention")
    attn, x, index = _reference_attention()
    expected = _attention_grads(attn, x, index)
    attn.attn_backend = "flex"
    with torch.no_grad():
        assert torch.allclose(attn(x, index), expected[0], rtol=0, atol=1e-5)
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    for name, want, got in zip(("out", "input grad", "qkv grad", "table grad"), expected,
                               _attention_grads(attn, x, index, forward=compiled)):
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (name, (got - want).abs().max())
    torch._dynamo.reset()


def test_backends_agree_on_a_whole_model() -> None:
    torch.manual_seed(0)
    model = models.create_model("coatnet_pico", num_classes=10, img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    logits = {}
    with torch.no_grad():
        for backend in ("math", "sdpa", "flex", "auto"):
            model.set_attn_backend(backend)
            logits[backend] = model(images)
    for backend in ("sdpa", "flex", "auto"):
        assert torch.allclose(logits[backend], logits["math"], rtol=0, atol=1e-5), backend


def test_attn_backend_config_and_resolution() -> None:
    model = models.create_model("coatnet_pico", img_size=64, attn_backend="math")
    assert model.config.attn_backend == "math"
    assert {m.attn_backend for m in model.modules() if isinstance(m, RelativeAttention)} == {"math"}
    assert resolve_attn_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="attn_backend"):
        models.create_model("coatnet_pico", attn_backend="cudnn")


def test_squeeze_excite_init_matches_timm() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = dict(timm.create_model("coatnet_0_224").named_parameters())
    ours = dict(models.create_model("coatnet_0").named_parameters())
    for name in ("stages.0.blocks.0.se.fc1", "stages.0.blocks.0.se.fc2", "stages.1.blocks.2.se.fc1"):
        want, got = reference[f"{name}.weight"], ours[f"{name}.weight"]
        assert abs(got.std() / want.std() - 1) < 0.1 and abs(got.mean()) < 0.1 * want.std(), name
        assert torch.equal(ours[f"{name}.bias"], reference[f"{name}.bias"])  # zeros in both
