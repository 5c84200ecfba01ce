"""The one place a PEFT method is registered: name -> (config class, tuner class, parameter prefix).

A method file in `tuners/` ends with one `register_peft_method(...)` call; everything else (config loading by
`peft_type`, `get_peft_model`, the adapter-file key mapping, the conformance tests) looks methods up here.
This module imports nothing from peftkit (the method files import it); `peftkit/__init__.py` imports every
method file, so the table is complete once `peftkit` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeftMethod:
    """What the library needs to know about one method.

    Attributes:
        peft_type: the upper-case name written to `adapter_config.json` (`"LORA"`).
        config_cls: the method's `PeftConfig` subclass.
        tuner_cls: the model-level tuner that injects the method's layers (None for prompt learning).
        prefix: the substring every adapter parameter name contains (`"lora_"`), used to find them.
        is_prompt_learning: True for methods that add virtual tokens instead of wrapping layers.
    """

    peft_type: str
    config_cls: type
    tuner_cls: type | None
    prefix: str
    is_prompt_learning: bool = False


_METHODS: dict[str, PeftMethod] = {}


def register_peft_method(
    *, peft_type: str, config_cls: type, tuner_cls: type | None, prefix: str, is_prompt_learning: bool = False
) -> PeftMethod:
    """Register a method; raises if the name is already taken by a different method."""
    key = peft_type.upper()
    method = PeftMethod(key, config_cls, tuner_cls, prefix, is_prompt_learning)
    if key in _METHODS and _METHODS[key] != method:
        raise ValueError(f"PEFT method {key!r} is already registered by {_METHODS[key].config_cls.__name__}")
    _METHODS[key] = method
    return method


def get_method(peft_type: str) -> PeftMethod:
    """Look a method up by its `peft_type` (case-insensitive); the error lists the known ones."""
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in _METHODS:
        raise ValueError(f"Unknown peft_type {peft_type!r}; peftkit knows: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def all_methods() -> dict[str, PeftMethod]:
    """Every registered method, by peft_type."""
    return dict(_METHODS)
