"""CoAtNet model family, pure PyTorch. Public API (see docs/DESIGN.md, contract `models`)."""

from .coatnet import CoAtNet, CoAtNetConfig, StageConfig
from .flops import count_flops
from .relpos import relative_position_index, resize_state_dict, resize_table
from .timm_compat import from_timm_state_dict, to_timm_state_dict
from .variants import PRESETS, VARIANTS, create_model, get_config, list_models

__all__ = [
    "CoAtNet", "CoAtNetConfig", "StageConfig", "PRESETS", "VARIANTS",
    "create_model", "get_config", "list_models", "count_flops", "resize_state_dict",
    "from_timm_state_dict", "to_timm_state_dict", "relative_position_index", "resize_table",
]
