"""Names that changed across the transformers versions peftkit supports (see `pyproject.toml`).

transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache`; code that
passes or reads a cache uses `CACHE_KEY` so it runs on both sides of the rename. `configs_of` finds every
config (and sub-config) a model holds (`config_tree`: those below given configs), for code that switches
their attention implementation for a call.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def configs_of(base: nn.Module) -> list[PreTrainedConfig]:
    """Every transformers config the modules of `base` hold, and their sub-configs, each once."""
    return config_tree(
        [m.config for m in base.modules() if isinstance(getattr(m, "config", None), PreTrainedConfig)]
    )


def config_tree(configs: list[PreTrainedConfig]) -> list[PreTrainedConfig]:
    """`configs` and all their sub-configs, each once (no module walk: for a per-step call)."""
    found: dict[int, PreTrainedConfig] = {}
    stack = list(configs)
    while stack:
        config = stack.pop()
        if id(config) not in found:
            found[id(config)] = config
            subs = (getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
            stack.extend(c for c in subs if isinstance(c, PreTrainedConfig))
    return list(found.values())
