"""What a `PeftModel.generate` call will run with, read before the call: the caller's keyword when given, else
the base model's generation config (or the one the caller passed), as transformers resolves them. Used by the
speed-ups that `PeftModel.generate` switches on only for the plain case (`generate_prefix`, `kv_cache`,
`prompt_lookup`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def settings(model: Any, kwargs: dict[str, Any]) -> Callable[[str, Any], Any]:
    """`setting(name, default)` for the call `model.generate(**kwargs)` (model: a PeftModel)."""
    gen = kwargs.get("generation_config") or getattr(model.get_base_model(), "generation_config", None)

    def setting(name: str, default: Any) -> Any:
        return kwargs[name] if name in kwargs else getattr(gen, name, default)

    return setting


def prompt_learning(model: Any) -> bool:
    """Whether the active adapter is prompt learning (it hands `generate` virtual tokens or a cache of its own)."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))
