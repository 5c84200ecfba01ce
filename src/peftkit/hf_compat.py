"""Names that changed across the transformers versions peftkit supports (see `pyproject.toml`).

transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache`; code that
passes or reads a cache uses `CACHE_KEY` so it runs on both sides of the rename.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
