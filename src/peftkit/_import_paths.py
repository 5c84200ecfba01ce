"""Module paths HF peft has and integrations import, which peftkit's layout does not have as files.

`peftkit.tuners.lora` is one file (config, layers and model together), while code written for HF peft
imports `peft.tuners.lora.layer.LoraLayer` (transformers, diffusers), `...lora.config` and `...lora.model`.
Rather than split the file, `install()` registers small alias modules under those names in `sys.modules`
(Python's import finds a registered name before looking for a file), so `from peftkit.tuners.lora.layer
import LoraLayer` gives `peftkit.tuners.lora.LoraLayer` itself.
"""

from __future__ import annotations

import sys
import types

from .tuners import lora


def _alias(name: str, doc: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(attrs)
    module.__all__ = sorted(attrs)
    sys.modules.setdefault(name, module)
    return sys.modules[name]


def install() -> None:
    """Register `peftkit.tuners.lora.{layer,config,model}` (idempotent)."""
    base = lora.__name__
    lora.layer = _alias(
        f"{base}.layer",
        "Alias of peftkit.tuners.lora's layer classes under HF peft's names (lora.Linear, ...).",
        LoraLayer=lora.LoraLayer,
        Linear=lora.LoraLinear,
        Embedding=lora.LoraEmbedding,
        Conv2d=lora.LoraConv2d,
    )
    lora.config = _alias(
        f"{base}.config", "Alias of peftkit.tuners.lora.LoraConfig.", LoraConfig=lora.LoraConfig
    )
    lora.model = _alias(f"{base}.model", "Alias of peftkit.tuners.lora.LoraModel.", LoraModel=lora.LoraModel)
