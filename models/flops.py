"""FLOP counting with torch.utils.flop_counter.FlopCounterMode.

``count_flops`` returns MULTIPLY-ACCUMULATES (MACs) = FlopCounterMode's FLOPs / 2, the unit the
CoAtNet paper calls "FLOPs" (and timm's GMACs). Counted: convolutions, linear layers and the two
attention matmuls (q.k and attn.v: our CoAtNet runs its ``math`` attention backend while counted,
other models SDPA's math path, so that they are visible as matmuls). Not counted: norms,
activations, pooling, softmax, the bias add, SE's pooling - element-wise work that the paper's
figures also leave out.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .coatnet import CoAtNet


def count_flops(model: nn.Module, img_size: int | tuple[int, int] | None = None, batch_size: int = 1) -> int:
    """Multiply-accumulates of one eval forward pass at ``img_size`` (default: the model's).

    Works on the meta device (no memory is allocated), so the largest variants are cheap to count.
    """
    if img_size is None:
        img_size = getattr(model, "img_size", 224)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    if isinstance(model, CoAtNet) and (height, width) != model.img_size:
        # the bias tables are sized for the model's grid: count a same-config twin on the meta device
        with torch.device("meta"):
            model = CoAtNet(model.config, num_classes=model.num_classes, img_size=(height, width))
    param = next(model.parameters())
    images = torch.zeros(batch_size, 3, height, width, device=param.device, dtype=param.dtype)
    was_training = model.training
    # Our attention picks its SDPA kernels itself (overriding an outer sdpa_kernel): count its
    # explicit math path, whose two matmuls are what SDPA's math path counts, on every device.
    config = getattr(model, "config", None)
    if isinstance(model, CoAtNet):
        model.set_attn_backend("math")
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
        if isinstance(model, CoAtNet):
            model.set_attn_backend(config.attn_backend)
            model.config = config
    return counter.get_total_flops() // 2
