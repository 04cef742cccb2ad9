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


def test_meta_then_to_empty_then_init_weights_equals_direct_build() -> None:
    torch.manual_seed(0)
    direct = models.create_model("coatnet_nano", num_classes=10, img_size=64)
    meta = models.create_model("coatnet_nano", num_classes=10, img_size=64, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device="cpu")
    # to_empty leaves uninitialised memory; the relative index is rebuilt exactly anyway
    for stage in meta.stages:
        if hasattr(stage, "relative_position_index"):
            assert torch.equal(stage.relative_position_index, relative_position_index(stage.grid))
    torch.manual_seed(0)
    meta.init_weights()
    assert str(meta) == str(direct)
    built, materialised = direct.state_dict(keep_vars=True), meta.state_dict(keep_vars=True)
    assert built.keys() == materialised.keys()
    # children-first init replays the constructors' order: same seed, same weights
    for key, want in built.items():
        assert torch.equal(materialised[key], want), key
    for (name, want), (_, got) in zip(direct.named_buffers(), meta.named_buffers()):
        assert torch.equal(got, want), name

    torch.manual_seed(1)  # another seed: same statistics (the bias tables, SE and BN included)
    meta.init_weights()
    for key, want in built.items():
        got, want = materialised[key].detach(), want.detach()
        if want.is_floating_point() and want.numel() >= 256:
            assert abs(got.mean() - want.mean()) <= 0.2 * want.std() + 1e-6, key
            assert abs(got.std() - want.std()) <= 0.2 * want.std() + 1e-6, key


def test_init_weights_repairs_a_trained_model() -> None:
    torch.manual_seed(0)
    model = models.create_model("coatnet_pico", num_classes=10, img_size=64)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(3) if tensor.is_floating_point() else tensor.fill_(7)
        model.stages[2].relative_position_index.fill_(10**14)
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert torch.equal(model.stages[2].relative_position_index, relative_position_index(model.stages[2].grid))


def test_coatnet_7_on_meta_is_fast_and_memoryless() -> None:
    import time

    start = time.perf_counter()
    model = models.create_model("coatnet_7", device="meta")
    elapsed = time.perf_counter() - start
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 2.442e9 - 1) < 5e-4, count
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert elapsed < 10, elapsed


def _pico_state(img_size) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return models.create_model("coatnet_pico", num_classes=10, img_size=img_size).state_dict()


TABLE_S3 = "stages.2.blocks.0.attn.relative_position_bias_table"
TABLE_S4 = "stages.3.blocks.0.attn.relative_position_bias_table"


def test_resize_reads_the_config_resize_mode() -> None:
    state = _pico_state(64)
    default = models.resize_state_dict(state, 128)
    bicubic_config = models.get_config("coatnet_pico", resize_mode="bicubic")
    by_config = models.resize_state_dict(state, 128, config=bicubic_config)
    explicit = models.resize_state_dict(state, 128, mode="bicubic")
    assert torch.equal(by_config[TABLE_S3], explicit[TABLE_S3])
    assert not torch.equal(by_config[TABLE_S3], default[TABLE_S3])
    assert torch.equal(models.resize_state_dict(state, 128, mode="bilinear", config=bicubic_config)[TABLE_S3],
                       default[TABLE_S3])


def test_resize_without_the_last_stage_still_resizes() -> None:
    state = {k: v for k, v in _pico_state(64).items() if not k.startswith("stages.3.")}
    resized = models.resize_state_dict(state, 128)  # old size from stage 2's table at 1/16: 64 px
    assert resized[TABLE_S3].shape[-2:] == (15, 15)
    assert torch.equal(models.resize_state_dict(state, 128, old_img_size=64)[TABLE_S3], resized[TABLE_S3])
    assert torch.equal(models.resize_state_dict(state, 64)[TABLE_S3], state[TABLE_S3])


def test_resize_raises_when_tables_disagree() -> None:
    state = _pico_state(64)
    state[TABLE_S4] = _pico_state(128)[TABLE_S4]
    with pytest.raises(ValueError, match="different image sizes"):
        models.resize_state_dict(state, 128)
    with pytest.raises(ValueError, match="does not belong"):
        models.resize_state_dict(_pico_state(64), 128, old_img_size=96,
                                 config=models.get_config("coatnet_pico"))


def test_resize_split_s3_layout_of_coatnet_7() -> None:
    config = models.get_config("coatnet_7")
    state = {k: torch.zeros(t.shape) for k, t in
             models.create_model("coatnet_7", img_size=224, device="meta").state_dict().items() if "table" in k}
    state["stages.4.blocks.0.mlp.fc1.bias"] = torch.zeros(1)  # the family layout is told apart by key
    for cfg in (None, config):
        resized = models.resize_state_dict(state, 448, config=cfg)
        assert resized["stages.3.blocks.0.attn.relative_position_bias_table"].shape[-2:] == (55, 55)
        assert resized["stages.4.blocks.0.attn.relative_position_bias_table"].shape[-2:] == (27, 27)


@pytest.mark.slow   # inductor on CPU: 47-90 s with a cold compile cache on 2 cores, 5-8 s warm
def test_compile_blocks_matches_eager_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = models.create_model("coatnet_pico", num_classes=10, img_size=64, drop_path_rate=0.0)
    images, labels = torch.randn(2, 3, 64, 64), torch.arange(2)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_logits, eager_grads = step()
    torch._dynamo.reset()
    model.compile_blocks(dynamic=False)
    assert all("forward" in block.__dict__ for block in model.blocks())
    calls: list[str] = []  # hooks on a block run eagerly around its compiled forward (ZeRO-3's do)
    handles = [block.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
               for block in model.blocks()]
    logits, grads = step()
    assert len(calls) == len(model.blocks())
    for handle in handles:
        handle.remove()
    model.compile_blocks(False)
    assert not any("forward" in block.__dict__ for block in model.blocks())
    torch._dynamo.reset()
    assert torch.allclose(logits, eager_logits, rtol=0, atol=1e-4)
    for name, want in eager_grads.items():
        assert torch.allclose(grads[name], want, rtol=1e-3, atol=1e-4), (name, (grads[name] - want).abs().max())


@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_bf16_weights_stay_close_to_fp32(backend: str) -> None:
    """LayerNorm/BatchNorm kernels keep their statistics in fp32 for bf16 tensors, SDPA/flex
    accumulate the softmax in fp32, and the math backend upcasts its softmax: bf16 costs only
    its own rounding (~0.5% of the logits here), not a blow-up."""
    torch.manual_seed(0)
    model = models.create_model("coatnet_pico", num_classes=10, img_size=64, attn_backend=backend).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(images.bfloat16().float())
        model.bfloat16()
        got = model(images.bfloat16()).float()
    assert ((got - reference).abs().max() / reference.abs().max()).item() < 0.02


def test_compile_blocks_compiles_one_graph_per_block_shape() -> None:
    """Per-block constants that differ (a float drop-path rate) would recompile every block and,
    past dynamo's recompile limit (8), silently fall back to eager for the rest of the model."""
    from torch._dynamo.utils import counters

    model = models.create_model("coatnet_1", num_classes=10, img_size=64)  # 26 blocks, rates all different
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(backend="eager", dynamic=False)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    # stem, head, and per stage: its first block (stride/width change; rate 0 in stage 0) and the rest
    assert counters["stats"]["unique_graphs"] == 2 + 2 * len(model.stages)
    torch._dynamo.reset()


def test_count_flops_is_the_same_for_every_backend_and_device() -> None:
    """Our restricted sdpa_kernel overrides an outer one: count_flops counts the math path."""
    counts = set()
    for backend in ("auto", "sdpa", "math"):
        for device in ("meta", "cpu"):
            model = models.create_model("coatnet_pico", img_size=64, attn_backend=backend, device=device)
            counts.add(models.count_flops(model))
            assert model.config.attn_backend == backend
            assert {m.attn_backend for m in model.modules() if isinstance(m, RelativeAttention)} == {backend}
    assert len(counts) == 1, counts


def test_flex_captures_an_fp32_table_for_bf16_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's bf16 engine makes the bias table a bf16 parameter. FlexAttention accumulates a
    captured buffer's gradient in fp32 and (torch without pytorch#174251) hands it back uncast when
    the buffer was made inside the compiled region: a dtype error in backward. The flex path
    captures an fp32 table; the gradient reaches the bf16 parameter through one cast. Checked in
    the traced graph and through flex's dense backward (no CPU flex backward: guard lifted)."""
    flex_module = pytest.importorskip("torch.nn.attention.flex_attention")
    attn, x, index = _reference_attention()
    expected = _attention_grads(attn, x, index)
    attn.attn_backend = "flex"
    attn.bfloat16()
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    captured: list[torch.dtype] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "flex_attention" in str(node.target):
                buffers = [b for arg in node.args if isinstance(arg, tuple) for b in arg
                           if isinstance(b, torch.fx.Node)]   # score_mod / mask_mod buffers
                values = [b.meta.get("example_value") for b in buffers]
                captured.extend(v.dtype for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(attn, backend=backend, fullgraph=True)
    got = _attention_grads(attn, x.bfloat16(), index, forward=compiled)
    torch._dynamo.reset()
    assert captured == [torch.float32], captured
    assert got[3].dtype == torch.bfloat16
    for name, want, value in zip(("out", "input grad", "qkv grad", "table grad"), expected, got):
        rel = ((value.float() - want).norm() / want.norm()).item()
        assert rel < 0.02, (name, rel)   # bf16 rounding of weights and activations
