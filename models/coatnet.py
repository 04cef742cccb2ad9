"""CoAtNet (Dai et al. 2021): blocks and network, pure PyTorch.

Layout: convolution stages (stem, MBConv) run on NCHW tensors; Transformer stages run on
channels-last NHWC tensors, so that norms, the fused qkv projection and the FFN are plain
``nn.LayerNorm`` / ``nn.Linear`` on the last dimension and no permutes are needed between blocks.
The defaults reproduce timm's paper-config ``coatnet_N_224`` exactly (see ``models/timm_compat.py``
for the weight mapping); each departure from the paper is a named field of ``CoAtNetConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .relpos import RESIZE_MODES, relative_position_index, table_shape

StrideMode = Literal["dw", "expand"]
PoolType = Literal["avg", "max"]
AttnBackend = Literal["auto", "sdpa", "flex", "math"]
ATTN_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flex", "math")


@dataclass(frozen=True)
class StageConfig:
    """One stage: block kind ('C' = MBConv, 'T' = Transformer), depth, width, first-block stride."""

    kind: Literal["C", "T"]
    depth: int
    width: int
    stride: int = 2


@dataclass(frozen=True)
class CoAtNetConfig:
    """Architecture of one variant. Defaults match timm's ``coatnet_N_224`` (Table 9 form)."""

    name: str
    stem_width: int
    stages: tuple[StageConfig, ...]
    head_hidden_size: int | None  # pre-logits Linear+tanh width (timm / TF MaxViT head); None: no pre-logits
    dim_head: int = 32
    drop_path_rate: float = 0.0  # the variant's default stochastic-depth rate (Table 10)
    mbconv_expand: int = 4
    se_ratio: float = 0.25  # of the block's output width (timm, TF)
    se_act: Literal["silu", "gelu"] = "silu"
    stride_mode: StrideMode = "dw"  # 'dw': stride-2 depthwise conv (Table 9, timm); 'expand': stride on the 1x1 expand conv (Eq. 5)
    pool: PoolType = "avg"  # 2x2 stride-2 pooling for downsampling (timm: avg; paper: max)
    ffn_expand: int = 4
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1  # PyTorch's convention (new = (1 - m) old + m batch); TF's 0.99 is 0.01 here
    ln_eps: float = 1e-6
    # stochastic depth from 0 at the first block: 'linear' reaches the rate at the last block
    # (timm); 'reference' gives block i of L the rate x i / L (the TF MaxViT code), the last rate x (L-1)/L
    drop_path_schedule: Literal["linear", "reference"] = "linear"
    resize_mode: str = "bilinear"  # bias-table interpolation when the image size changes
    channels_last: bool = True  # run the conv stages in channels_last memory format (faster on CPU)
    attn_backend: AttnBackend = "auto"  # see RelativeAttention; every backend computes the same function

    def __post_init__(self) -> None:
        if self.stride_mode not in ("dw", "expand"):
            raise ValueError(f"stride_mode must be 'dw' or 'expand', got {self.stride_mode!r}")
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        if self.se_act not in ("silu", "gelu"):
            raise ValueError(f"se_act must be 'silu' or 'gelu', got {self.se_act!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.drop_path_schedule not in ("linear", "reference"):
            raise ValueError(f"drop_path_schedule must be 'linear' or 'reference', got {self.drop_path_schedule!r}")
        if not 0.0 < self.bn_momentum < 1.0 or self.bn_eps <= 0:
            raise ValueError(f"bn_momentum must be in (0, 1) and bn_eps > 0, got {self.bn_momentum}, {self.bn_eps}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        for stage in self.stages:
            if stage.kind == "T" and stage.width % self.dim_head:
                raise ValueError(f"stage width {stage.width} is not divisible by dim_head {self.dim_head}")
        seen_transformer = False
        for stage in self.stages:
            if stage.kind == "C" and seen_transformer:
                raise ValueError("MBConv stages must come before Transformer stages (C-C-T-T)")
            seen_transformer |= stage.kind == "T"

    @property
    def total_stride(self) -> int:
        return 2 * math.prod(stage.stride for stage in self.stages)


# ----------------------------------------------------------------------------- layers
# Initialisation lives in each layer's reset_parameters so that it runs before DeepSpeed's
# zero.Init partitions the layer's parameters (it partitions at the end of every module __init__).


class ConvEffInit(nn.Conv2d):
    """Conv2d with EfficientNet's fan-out normal init (timm's MBConv/stem init)."""

    def reset_parameters(self) -> None:
        fan_out = self.kernel_size[0] * self.kernel_size[1] * self.out_channels // self.groups
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_out))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LinearXavier(nn.Linear):
    """Linear with ViT init: xavier-uniform weight, bias zero (or N(0, bias_std))."""

    def __init__(self, in_features: int, out_features: int, bias_std: float = 0.0, **kwargs) -> None:
        self.bias_std = bias_std
        super().__init__(in_features, out_features, **kwargs)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.normal_(self.bias, std=self.bias_std) if self.bias_std else nn.init.zeros_(self.bias)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample.

    The keep probability is also a (non-persistent) buffer: torch.compile specialises on Python
    floats read from a module, so a float rate that differs in every block would recompile every
    block (and past dynamo's recompile limit, silently run eager); a buffer is a graph input.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate
        self.active = rate > 0.0  # forward reads this bool, never the float
        self.register_buffer("keep_prob", torch.tensor(1.0 - rate), persistent=False)

    def reset_buffers(self) -> None:
        # fp32 whatever the model's dtype: 1 - rate in bf16 would be off by up to 0.4%
        self.keep_prob = torch.tensor(1.0 - self.rate, dtype=torch.float32, device=self.keep_prob.device)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        super()._apply(fn, recurse)
        if self.keep_prob.device.type != "meta":  # to_empty() leaves uninitialised memory
            self.reset_buffers()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.active:
            return x
        keep = self.keep_prob.to(x.device)
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(keep)
        return x * mask.div_(keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics may stay fp32 while the weights are bf16 (DeepSpeed's
    bf16 engine casts parameters, not buffers): the affine weights are then upcast for the call,
    PyTorch's mixed-type kernel (bf16 input, fp32 weights and statistics, bf16 output). Running
    statistics in bf16 would round away updates below ~0.4% of their value (momentum 0.01 of the
    reference: every update of a settled statistic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        if stats is None or self.weight is None or self.weight.dtype == stats.dtype:
            return super().forward(x)
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, stats, self.running_var, self.weight.to(stats.dtype), self.bias.to(stats.dtype),
                            self.training, self.momentum, self.eps)


class BatchNormAct2d(BatchNorm2d):
    """BatchNorm2d followed by GELU (state-dict names of a plain BatchNorm2d, as timm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(super().forward(x))


def pool2d(x: torch.Tensor, pool: PoolType) -> torch.Tensor:
    """2x2, stride-2 pooling of an NCHW tensor."""
    return F.avg_pool2d(x, 2) if pool == "avg" else F.max_pool2d(x, 2)


def pool_nhwc(x: torch.Tensor, pool: PoolType) -> torch.Tensor:
    """2x2, stride-2 pooling of an NHWC tensor (the NCHW-strided view is channels_last)."""
    return pool2d(x.permute(0, 3, 1, 2), pool).permute(0, 2, 3, 1)


class SqueezeExcite(nn.Module):
    """SE with timm's init: its MBConv init_weights gives every Conv2d in the block, SE included,
    the EfficientNet fan-out normal init (fc1 weight std sqrt(2/reduced)), biases zero."""

    def __init__(self, channels: int, reduced: int, act: str) -> None:
        super().__init__()
        self.fc1 = ConvEffInit(channels, reduced, 1)
        self.fc2 = ConvEffInit(reduced, channels, 1)
        self.act = nn.SiLU() if act == "silu" else nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


# ----------------------------------------------------------------------------- blocks


class Stem(nn.Module):
    """S0: 3x3 conv stride 2, BN+GELU, 3x3 conv (no norm after: the next block pre-norms)."""

    def __init__(self, in_chans: int, width: int, bn_eps: float, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = ConvEffInit(in_chans, width, 3, stride=2, padding=1, bias=False)
        self.norm1 = BatchNormAct2d(width, eps=bn_eps, momentum=bn_momentum)
        self.conv2 = ConvEffInit(width, width, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class MBConvBlock(nn.Module):
    """Pre-norm MBConv: x + Proj(SE(DWConv(Expand(BN(x))))); downsampling per Table 9 or Eq. 5."""

    def __init__(self, dim_in: int, dim_out: int, stride: int, cfg: CoAtNetConfig, drop_path: float) -> None:
        super().__init__()
        self.stride = stride
        self.pool = cfg.pool
        mid = dim_out * cfg.mbconv_expand
        self.shortcut_proj = ConvEffInit(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()
        expand_stride, dw_stride = (stride, 1) if cfg.stride_mode == "expand" else (1, stride)
        self.pre_norm = BatchNorm2d(dim_in, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.conv1_1x1 = ConvEffInit(dim_in, mid, 1, stride=expand_stride, bias=False)
        self.norm1 = BatchNormAct2d(mid, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.conv2_kxk = ConvEffInit(mid, mid, 3, stride=dw_stride, padding=1, groups=mid, bias=False)
        self.norm2 = BatchNormAct2d(mid, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.se = SqueezeExcite(mid, int(cfg.se_ratio * dim_out), cfg.se_act)
        self.conv3_1x1 = ConvEffInit(mid, dim_out, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = pool2d(x, self.pool) if self.stride == 2 else x
        shortcut = self.shortcut_proj(shortcut)
        x = self.norm1(self.conv1_1x1(self.pre_norm(x)))
        x = self.se(self.norm2(self.conv2_kxk(x)))
        return shortcut + self.drop_path(self.conv3_1x1(x))


# SDPA backends that accept an attn_mask that requires grad. cuDNN (preferred on H100 by
# torch >= 2.5 for some shapes) refuses one in training; CUDA flash takes no mask at all and is
# skipped by the dispatcher; on CPU "flash" is the fused CPU kernel, which takes a grad mask.
_SDPA_GRAD_MASK_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

_compiled_flex_attention: Callable[..., torch.Tensor] | None = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    score_mod: Callable[..., torch.Tensor]) -> torch.Tensor:
    """flex_attention, compiled once per process when called eagerly on a GPU (uncompiled, it
    materialises the full score matrix); inside torch.compile it is traced as part of the graph."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, score_mod=score_mod)


def resolve_attn_backend(backend: str, device: torch.device) -> str:
    """The backend 'auto' stands for: flex inside torch.compile on CUDA (a fused kernel that reads
    the table through the index: no per-head N x N bias and no N x N bias gradient in memory),
    else SDPA restricted to the backends that take a learned bias (every other case, CPU included:
    eager flex_attention materialises the scores, and PyTorch has no flex backward on CPU)."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and torch.compiler.is_compiling():
        return "flex"
    return "sdpa"


class RelativeAttention(nn.Module):
    """Global multi-head self-attention over tokens with a learned 2-D relative bias per head.

    The bias is added to q.k/sqrt(d) before the softmax (Eq. 3). Backends (``attn_backend``), all
    the same function: 'sdpa' passes the gathered (heads, N, N) bias to scaled_dot_product_attention
    as an additive mask, restricted to the kernels that train with it; 'flex' adds
    ``table[h, index[q, kv]]`` in flex_attention's score_mod; 'math' is the matmul-softmax
    reference (softmax in fp32); 'auto' picks per call (``resolve_attn_backend``).
    """

    def __init__(self, dim_in: int, dim_out: int, dim_head: int, grid: tuple[int, int],
                 attn_backend: AttnBackend = "auto") -> None:
        super().__init__()
        self.num_heads = dim_out // dim_head
        self.dim_head = dim_head
        self.attn_backend = attn_backend
        self.qkv = LinearXavier(dim_in, 3 * dim_out)  # output order (q|k|v, head, dim_head)
        self.proj = LinearXavier(dim_out, dim_out)
        self.relative_position_bias_table = nn.Parameter(torch.empty(self.num_heads, *table_shape(grid)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        table = self.relative_position_bias_table.flatten(1)
        backend = resolve_attn_backend(self.attn_backend, x.device)
        if backend == "flex":
            # The captured table in fp32 (a bf16 one, made inside a compiled region, gets its fp32
            # gradient back uncast: pytorch#174018); its backward casts once to the parameter's dtype.
            index2d, table = index.view(tokens, tokens), table.float()

            def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                          kv_idx: torch.Tensor) -> torch.Tensor:
                return score + table[h, index2d[q_idx, kv_idx]].to(score.dtype)

            x = _flex_attention(q, k, v, score_mod)
        else:
            bias = table.index_select(1, index).view(1, self.num_heads, tokens, tokens).to(q.dtype)
            if backend == "math":
                attn = (q * self.dim_head ** -0.5) @ k.transpose(-2, -1) + bias
                x = attn.float().softmax(dim=-1).to(v.dtype) @ v
            else:
                with sdpa_kernel(_SDPA_GRAD_MASK_BACKENDS):
                    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = LinearXavier(dim, hidden, bias_std=1e-6)
        self.fc2 = LinearXavier(hidden, dim, bias_std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block on NHWC input.

    Downsampling (Eq. 4): x <- Proj(Pool(x)) + Attention(Pool(Norm(x))). A width change without
    stride (CoAtNet-6/7's S3 split) projects the shortcut and lets attention widen the channels.
    """

    def __init__(self, dim_in: int, dim_out: int, stride: int, grid: tuple[int, int], cfg: CoAtNetConfig,
                 drop_path: float) -> None:
        super().__init__()
        self.stride = stride
        self.pool = cfg.pool
        self.shortcut_proj = LinearXavier(dim_in, dim_out) if dim_in != dim_out else nn.Identity()
        self.norm1 = nn.LayerNorm(dim_in, eps=cfg.ln_eps)
        self.attn = RelativeAttention(dim_in, dim_out, cfg.dim_head, grid, cfg.attn_backend)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim_out, eps=cfg.ln_eps)
        self.mlp = Mlp(dim_out, dim_out * cfg.ffn_expand)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            shortcut = self.shortcut_proj(pool_nhwc(x, self.pool))
            x = pool_nhwc(self.norm1(x), self.pool)
        else:
            shortcut = self.shortcut_proj(x)
            x = self.norm1(x)
        batch, height, width, channels = x.shape
        x = self.attn(x.reshape(batch, height * width, channels), index).view(batch, height, width, -1)
        x = shortcut + self.drop_path1(x)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- stages and network


class ConvStage(nn.Module):
    def __init__(self, dim_in: int, spec: StageConfig, cfg: CoAtNetConfig, drop_paths: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConvBlock(dim_in if i == 0 else spec.width, spec.width, spec.stride if i == 0 else 1, cfg, rate)
            for i, rate in enumerate(drop_paths)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class TransformerStage(nn.Module):
    """Transformer blocks at one grid size; owns the (shared, non-persistent) relative index."""

    def __init__(self, dim_in: int, spec: StageConfig, grid: tuple[int, int], cfg: CoAtNetConfig,
                 drop_paths: list[float]) -> None:
        super().__init__()
        self.grid = grid
        self.blocks = nn.ModuleList(
            TransformerBlock(dim_in if i == 0 else spec.width, spec.width, spec.stride if i == 0 else 1, grid, cfg,
                             rate)
            for i, rate in enumerate(drop_paths)
        )
        # Built on the CPU whatever the default device (zero.Init): it is cheap and exact.
        self.register_buffer("relative_position_index", relative_position_index(grid, device="cpu"),
                             persistent=False)
        self.grad_checkpointing = False

    def reset_buffers(self) -> None:
        """Recompute the relative index in place (its values are a function of the grid)."""
        index = self.relative_position_index
        self.relative_position_index = relative_position_index(self.grid, device=index.device)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # to_empty(), .to(), .cuda() all come here: whatever fn did to the index (to_empty leaves
        # uninitialised memory, values up to 1e14), rebuild it exactly on its new device.
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.relative_position_index
        if index.device != x.device and x.device.type != "meta":
            # a model whose modules were moved without nn.Module.to (e.g. by hand or by a wrapper)
            index = relative_position_index(self.grid, device=x.device)
            self.relative_position_index = index
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, index, use_reentrant=False)
            else:
                x = block(x, index)
        return x


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm -> [Linear + tanh pre-logits] -> classifier (timm names)."""

    def __init__(self, dim: int, hidden: int | None, num_classes: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        if hidden:
            self.pre_logits = nn.Sequential(OrderedDict([("fc", nn.Linear(dim, hidden)), ("act", nn.Tanh())]))
        else:
            self.pre_logits = nn.Identity()
        self.num_features = hidden or dim
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: NHWC
        return self.fc(self.pre_logits(self.norm(x.mean((1, 2)))))


def _to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {size!r}")
    return size  # type: ignore[return-value]


class CoAtNet(nn.Module):
    """CoAtNet classifier: images[B,3,H,W] -> logits[B,num_classes]."""

    def __init__(self, config: CoAtNetConfig, num_classes: int = 1000, img_size: int | tuple[int, int] = 224,
                 drop_path_rate: float | None = None, grad_checkpointing: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        img_size = _to_2tuple(img_size)
        stride = config.total_stride
        if any(s <= 0 or s % stride for s in img_size):
            raise ValueError(f"img_size {img_size} must be positive and divisible by {stride} for {config.name}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        rate = config.drop_path_rate if drop_path_rate is None else drop_path_rate
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        self.drop_path_rate = rate

        self.stem = Stem(in_chans, config.stem_width, config.bn_eps, config.bn_momentum)
        total_blocks = sum(stage.depth for stage in config.stages)
        if config.drop_path_schedule == "reference":
            rates = [rate * i / total_blocks for i in range(total_blocks)]
        else:
            rates = torch.linspace(0, rate, total_blocks, device="cpu").tolist() if total_blocks > 1 else [rate]
        grid = (img_size[0] // 2, img_size[1] // 2)
        dim, first = config.stem_width, 0
        stages: list[nn.Module] = []
        for spec in config.stages:
            grid = (grid[0] // spec.stride, grid[1] // spec.stride)
            block_rates = rates[first:first + spec.depth]
            if spec.kind == "C":
                stages.append(ConvStage(dim, spec, config, block_rates))
            else:
                stages.append(TransformerStage(dim, spec, grid, config, block_rates))
            dim, first = spec.width, first + spec.depth
        self.stages = nn.ModuleList(stages)
        self.num_features = dim
        self.head = ClassifierHead(dim, config.head_hidden_size, num_classes, config.ln_eps)
        self.set_grad_checkpointing(grad_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final feature map, NHWC."""
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        in_tokens = False
        for stage in self.stages:
            if isinstance(stage, TransformerStage) and not in_tokens:
                x = x.permute(0, 2, 3, 1).contiguous()  # NCHW -> NHWC, free when channels_last
                in_tokens = True
            x = stage(x)
        return x if in_tokens else x.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (keeps norm and pre-logits), e.g. to fine-tune on a new label set."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        old = self.head.fc
        self.head.fc = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        """Norm weights, all biases and relative-position bias tables."""
        # ds_shape: the full shape of a parameter partitioned by DeepSpeed ZeRO-3
        return {name for name, param in self.named_parameters()
                if len(getattr(param, "ds_shape", param.shape)) <= 1 or "relative_position_bias_table" in name}

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter and buffer as at construction, e.g. after building on
        the meta device and ``to_empty()``. Visits modules children-first, in registration order
        (the order their constructors ran), so under the same seed the weights equal a directly
        built model's."""

        def visit(module: nn.Module) -> None:
            for child in module.children():
                visit(child)
            for reset in ("reset_parameters", "reset_buffers"):
                if callable(getattr(module, reset, None)):
                    getattr(module, reset)()

        visit(self)

    def blocks(self) -> list[nn.Module]:
        """The units compiled by ``compile_blocks`` (and natural ZeRO-3 leaf modules): the stem,
        every MBConv and Transformer block, the head."""
        return [self.stem, *(block for stage in self.stages for block in stage.blocks), self.head]

    def compile_blocks(self, enable: bool = True, blocks: list[nn.Module] | None = None,
                       **compile_kwargs: Any) -> None:
        """torch.compile the ``forward`` of ``blocks`` (default: all of ``blocks()``) in place;
        ``enable=False`` restores eager everywhere. Only ``forward`` is compiled, not ``__call__``:
        hooks on a block run eagerly around its graph. Under DeepSpeed ZeRO-3 the blocks must be
        leaf modules (``pipeline.engine.compile_engine``), else ZeRO-3's hooks on their layers
        break the graphs and their released parameters break backward.
        """
        chosen = {id(b) for b in (self.blocks() if blocks is None else blocks)}
        for block in self.blocks():
            block.__dict__.pop("forward", None)  # back to the class's forward
            if enable and id(block) in chosen:
                block.forward = torch.compile(block.forward, **compile_kwargs)

    def set_attn_backend(self, backend: AttnBackend) -> None:
        """Switch every attention layer's backend (and the config's) in place."""
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")
        self.config = dataclasses.replace(self.config, attn_backend=backend)
        for module in self.modules():
            if isinstance(module, RelativeAttention):
                module.attn_backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable
