"""Small user-facing helpers (HF peft's `peft.helpers`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .tuners.lora_layers import LoraLayer

__all__ = ["cast_mixed_precision_params", "rescale_adapter_scale"]


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float | int) -> Iterator[None]:
    """Inside the block, every LoRA layer's update is multiplied by `multiplier` (its `scaling` per adapter);
    the previous scalings come back on exit, also after an exception.

    With a multiplier in [0, 1] this interpolates between the base model (0) and the fine-tuned one (1) without
    touching any weight (WiSE-FT for LoRA), which can help under a shift between training and test data.

    Args:
        model: any module containing LoRA layers (a PeftModel, or a model with adapters injected in place).
        multiplier: a float or int factor.

    Raises:
        TypeError: multiplier is not a number.
        ValueError: the model has no LoRA layer, or one has a merged adapter (its update is inside the weight,
            where a scaling change cannot reach; HF peft ignores it there, peftkit refuses).
    """
    if not isinstance(multiplier, (float, int)) or isinstance(multiplier, bool):
        raise TypeError(
            f"rescale_adapter_scale: multiplier must be a float or int, got {type(multiplier).__name__}"
        )
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(f"rescale_adapter_scale: {type(model).__name__} has no LoRA layers to rescale")
    merged = [m.module_name for m in layers if m.merged]
    if merged:
        raise ValueError(
            f"rescale_adapter_scale: adapters are merged into {merged[:3]}; unmerge first (model.unmerge_adapter())"
        )
    saved = {m: dict(m.scaling) for m in layers}
    for m in layers:
        m.scaling = {k: v * multiplier for k, v in m.scaling.items()}
    try:
        yield
    finally:
        for m, scaling in saved.items():
            m.scaling = scaling


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter in `dtype` (fp16/bf16: half the memory) and every trainable one in fp32
    (stable optimizer updates under autocast), in place. (HF peft exports it from `peft.utils` and the top level.)

    Raises:
        ValueError: `dtype` is not a floating-point torch dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"cast_mixed_precision_params: dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}"
        )
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def check_if_peft_model(model_name_or_path: str) -> bool:
    """True if `model_name_or_path` (a folder or Hub id) holds an adapter config peftkit can read."""
    from .config import PeftConfig

    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # not an adapter, unreadable, or unreachable: all mean "no"
        return False
    return True
