"""`replace_lora_weights_loftq`: re-initialise an existing LoRA adapter with LoftQ, one module at a time.

peftkit has no quantized layer types, so the "quantized base" is a float weight holding NormalFloat-rounded
values (`functional.loftq.nf_round_trip`). Given the original weights (`model_path`, a safetensors file or a
folder with `model.safetensors`), the current base weight is taken as the quantized one; without them the base is
quantized here first. Each LoRA Linear then gets B @ A = the rank-r fit of (original - quantized) / scaling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn

from ..functional import loftq as FQ
from .lora_layers import LoraLinear


def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Replace the LoRA A/B of `adapter_name` in every LoRA Linear by one LoftQ step, in place.

    Args:
        peft_model: a PeftModel (or any model with LoRA layers).
        model_path: original (unquantized) weights: a `.safetensors` file or a folder holding `model.safetensors`;
            keys are the base model's own parameter names. None: the current base weights are the originals and
            are replaced by their 4-bit NormalFloat quantization.
        adapter_name: the adapter to re-initialise.
        callback: called as `callback(model, module_name)` after each replacement; returning False undoes that
            module's replacement (e.g. when a quick check shows the model got worse).

    Raises:
        ValueError: no LoRA Linear holds `adapter_name`, or an original weight is missing from `model_path`.
    """
    originals = _open_originals(model_path)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = [
        (n, m) for n, m in base.named_modules() if isinstance(m, LoraLinear) and adapter_name in m.lora_A
    ]
    if not layers:
        raise ValueError(f"replace_lora_weights_loftq: no LoRA Linear layer holds adapter {adapter_name!r}")
    for name, layer in layers:
        saved = [t.detach().clone() for t in (layer.base_layer.weight, *_factors(layer, adapter_name))]
        _replace_one(layer, adapter_name, _original(originals, name, layer, model_path))
        if callback is not None and not callback(peft_model, name):
            with torch.no_grad():
                for t, old in zip(
                    (layer.base_layer.weight, *_factors(layer, adapter_name)), saved, strict=True
                ):
                    t.copy_(old)


def _factors(layer: LoraLinear, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight


@torch.no_grad()
def _replace_one(layer: LoraLinear, adapter_name: str, original: torch.Tensor | None) -> None:
    base = layer.base_layer.weight
    if original is None:  # quantize the base here
        original = layer._weight_rows().detach().float().clone()
        base.copy_(layer._from_rows(FQ.nf_round_trip(original)).to(base.dtype))
    quantized = layer._weight_rows().detach().float()
    L, R = FQ.low_rank(original.float() - quantized, layer.r[adapter_name])
    root = math.sqrt(layer.scaling[adapter_name])
    A, B = _factors(layer, adapter_name)
    A.copy_(R / root)
    B.copy_(L / root)


def _open_originals(model_path: str | None):
    if model_path is None:
        return None
    path = os.path.join(model_path, "model.safetensors") if os.path.isdir(model_path) else model_path
    if not os.path.isfile(path):
        raise ValueError(f"replace_lora_weights_loftq: no safetensors file at {path}")
    return safe_open(path, framework="pt")


def _original(originals, name: str, layer: LoraLinear, model_path: str | None) -> torch.Tensor | None:
    """The original weight of module `name`, with output units first (out, in), or None without a file."""
    if originals is None:
        return None
    key = f"{name}.weight"
    if key not in originals.keys():
        raise ValueError(f"replace_lora_weights_loftq: {model_path} has no tensor {key!r} for module {name}")
    w = originals.get_tensor(key)
    return w.T if layer.transposed else w
