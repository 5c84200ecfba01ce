"""Where an adapter's tensors live: the dtype/device rule of `autocast_adapter_dtype` and `low_cpu_mem_usage`.

HF peft's rule, which peftkit follows tensor for tensor (checked side by side in `tests/test_adapter_dtype.py`):

- an adapter tensor takes its base layer's device and, when floating point, its dtype (a bf16 base gives
  bf16 adapters);
- then, with `autocast_adapter_dtype=True` (the default), float16/bfloat16 adapter tensors are upcast to
  float32 (trainable tensors in half precision lose small updates to rounding);
- with `low_cpu_mem_usage=True` the tensors are created empty on the `meta` device (no memory, no init work)
  and take the rule above when loading materialises them.

Prompt-learning encoders are not adapter layers and keep their own float32 parameters, and LN tuning's
trainable copy of a norm layer keeps the base's dtype and device (`AdapterLayer.copies_base_layer`), as in HF
peft.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# what autocast upcasts: half precision, and the float8 formats this torch has
_HALF = (torch.float16, torch.bfloat16) + tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)


def _slots(container: Any, adapter_name: str) -> Iterator[tuple[Any, str, torch.Tensor]]:
    """(owner, key, tensor) for every tensor of `adapter_name` in one container: `owner[key] = t` sets it."""
    if adapter_name not in container:
        return
    item = container[adapter_name]
    if isinstance(item, nn.Module):
        for module in item.modules():
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    if tensor is not None:
                        yield store, key, tensor
    elif isinstance(item, torch.Tensor):
        yield container, adapter_name, item


def _placed(tensor: torch.Tensor, ref: torch.Tensor | None, autocast: bool, on_meta: bool) -> torch.Tensor:
    """`tensor` moved to follow `ref` (the base weight) under the module docstring's rule."""
    if not tensor.is_floating_point():
        return tensor
    if on_meta:  # the created tensor's dtype (half precision upcast under autocast), no memory
        dtype = torch.float32 if autocast and tensor.dtype in _HALF else tensor.dtype
        return torch.empty(tensor.shape, dtype=dtype, device="meta")
    device, dtype = tensor.device, tensor.dtype
    if ref is not None and ref.device.type != "meta":
        device = ref.device
    if ref is not None and ref.is_floating_point():
        dtype = ref.dtype
    if autocast and dtype in _HALF:
        dtype = torch.float32
    if tensor.device.type == "meta":  # materialised for loading, which overwrites every element
        return torch.empty(tensor.shape, dtype=dtype, device=device)
    return tensor.detach().to(device=device, dtype=dtype)


def place_tensors(
    module: nn.Module,
    attrs: tuple[str, ...],
    adapter_name: str,
    ref: torch.Tensor | None,
    autocast: bool,
    on_meta: bool,
) -> None:
    """Apply the rule to `adapter_name`'s tensors in `module`'s containers `attrs` (parameters stay
    parameters, with their `requires_grad`)."""
    for attr in attrs:
        for owner, key, tensor in list(_slots(getattr(module, attr), adapter_name)):
            new = _placed(tensor, ref, autocast, on_meta)
            if new is tensor:
                continue
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            owner[key] = new
