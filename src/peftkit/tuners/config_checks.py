"""The checks the weight-changing methods' configs share (LoRA, LoHa/LoKr, VeRA, OFT, BOFT, IA3), written once so
every config validates these fields the same way, with errors naming the config class and the field."""

from __future__ import annotations

import re
from typing import Any


def check_fields(
    config: Any,
    *,
    positive_ints: tuple[str, ...] = (),
    probabilities: tuple[str, ...] = (),
    bias_modes: tuple[str, ...] | None = None,
    name_lists: tuple[str, ...] = ("target_modules", "exclude_modules"),
) -> None:
    """Normalise and check `config` in place (from its `__post_init__`).

    - `name_lists`: a set or tuple of module names becomes a sorted list (what the file stores);
    - `positive_ints`: integers > 0 (a bool is not one);
    - `probabilities`: dropout-like values in [0, 1);
    - `bias_modes`: the values `config.bias` may take;
    - `layers_pattern` only together with `layers_to_transform` (as HF peft).
    """
    cls = type(config).__name__
    for name in name_lists:
        value = getattr(config, name, None)
        if isinstance(value, (set, tuple)):
            setattr(config, name, sorted(value))
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{cls}: {name} must be a positive integer, got {value!r}")
    for name in probabilities:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{cls}: {name} must be in [0, 1), got {value!r}")
    if bias_modes is not None and config.bias not in bias_modes:
        allowed = ", ".join(repr(m) for m in bias_modes[:-1]) + f" or {bias_modes[-1]!r}"
        raise ValueError(f"{cls}: bias must be {allowed}, got {config.bias!r}")
    if getattr(config, "layers_pattern", None) and getattr(config, "layers_to_transform", None) is None:
        raise ValueError(f"{cls}: layers_pattern only applies together with layers_to_transform")


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first `rank_pattern`/`alpha_pattern` key that matches the end of `module_name` (a name
    or regex, matched at a `.` boundary, as HF peft does), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
