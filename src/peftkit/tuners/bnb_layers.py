"""LoRA/DoRA and (IA)^3 on bitsandbytes Linear4bit/Linear8bitLt bases (QLoRA).

The base layer keeps its packed codes; the adapter holds its own float tensors (float32 by default, as on a
half-precision base) and its branch runs in that dtype on the input cast to it, its output cast back to the
base output's dtype. Wherever the math needs the base weight (DoRA's row norms, merging), it is dequantized
to float32 (out, in) on the fly (`quantized.dequantize_weight`); the formulas are the ones of
`functional/lora.py` and `functional/ia3.py`.

Merging into a quantized weight dequantizes it, adds the update and quantizes again, which rounds: the merged
layer's output differs from the unmerged one by up to the quantization step (a warning says so). Unmerging
restores the original quantized weight exactly (it is kept while merged), and `unload()` returns the untouched
base. For an exact merge, dequantize first (`peftkit.quantized.dequantize_linears_`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..quantized import dequantize_weight, quantized_bits, set_quantized_weight
from .base import AdapterLayer
from .ia3 import IA3Config, IA3Layer
from .lora_config import LoraConfig
from .lora_layers import LoraLayer, LoraLinear

_ROUNDING = (
    "merging an adapter into a {bits}-bit quantized base dequantizes the weight, adds the update and quantizes "
    "again: the merged model differs from the unmerged one by the quantization rounding. For an exact merge, "
    "call peftkit.quantized.dequantize_linears_(model) first."
)


class QuantizedMergeMixin:
    """merge/unmerge for an AdapterLayer whose base is a bitsandbytes layer: `merge_weight` runs on the
    dequantized float32 weight (out, in), the result is requantized; unmerge restores the kept original."""

    def _saved_weights(self) -> dict[str, tuple[nn.Parameter, Any]]:
        """adapter name -> (the quantized weight before merging it, its quantization state)."""
        return self.__dict__.setdefault("_quantized_before_merge", {})

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if (
            quantized_bits(self.base_layer) is None
        ):  # dequantized since (quantized.dequantize_linears_): exact
            return super().merge(safe_merge, adapter_names)
        names = self.active_adapters if adapter_names is None else adapter_names
        base = self.base_layer
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            with torch.no_grad():
                merged, _ = self.merge_weight(dequantize_weight(base), name)
                if safe_merge:
                    self._check_finite(merged, name)
                warnings.warn(_ROUNDING.format(bits=quantized_bits(base)), UserWarning, stacklevel=2)
                self._saved_weights()[name] = (base.weight, _quant_state(base))
                set_quantized_weight(base, merged)
            self._merge_bias(name, +1)
            self.merged_adapters.append(name)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        if quantized_bits(self.base_layer) is None:
            return super().check_merge(adapter_names)
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.merged_adapters and name in self.adapter_names:
                with torch.no_grad():
                    self._check_finite(self.merge_weight(dequantize_weight(self.base_layer), name)[0], name)

    def unmerge(self) -> None:
        """Put back the quantized weight each merge replaced (exact: no second rounding), last first."""
        base, saved = self.base_layer, self._saved_weights()
        if quantized_bits(base) is None and not saved:
            return super().unmerge()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight, state = saved.pop(name)
            base.weight = weight
            if quantized_bits(base) == 4:
                base.quant_state = state
            else:  # Linear8bitLt moves the codes into `base.state` at its next forward
                weight.CB, weight.SCB = state
                base.state.CB, base.state.SCB = None, None
            self._merge_bias(name, -1)


def _quant_state(module: nn.Module) -> Any:
    """What restoring a bitsandbytes weight needs besides the parameter: the 4-bit QuantState, or the 8-bit
    (codes (out, in) int8, row scales (out,))."""
    w = module.weight
    if quantized_bits(module) == 4:
        return w.quant_state
    scales = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
    return w.data, scales


class LoraLinearQuantized(QuantizedMergeMixin, LoraLinear):
    """LoRA/DoRA on a bitsandbytes Linear4bit/Linear8bitLt. A (r, in), B (out, r) as on `nn.Linear`."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        LoraLayer.__init__(self, base_layer, module_name)
        self.transposed = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, config: LoraConfig, init_weights: bool = True) -> None:
        init = config.init_lora_weights if init_weights else False
        if isinstance(init, str) and init.startswith(("pissa", "olora", "loftq", "corda", "eva")):
            raise ValueError(
                f"init_lora_weights={init!r} rewrites the base weight, which is {quantized_bits(self.base_layer)}"
                f"-bit quantized in {self.module_name}: initialise on the full-precision model and quantize "
                "after, or use init_lora_weights=True/'gaussian'"
            )
        super().update_layer(adapter_name, config, init_weights)

    def _adapter_dtype(self) -> torch.dtype:
        return torch.float32

    def _weight_rows(self) -> torch.Tensor:
        if quantized_bits(self.base_layer) is None:  # dequantized since: a plain Linear
            return self.base_layer.weight
        return dequantize_weight(self.base_layer)

    def _merged_ok(self, names: list[str], x: torch.Tensor) -> bool:
        return quantized_bits(self.base_layer) is None and super()._merged_ok(names, x)

    def _in_place_ok(self, name: str, result: torch.Tensor, x: torch.Tensor) -> bool:
        return quantized_bits(self.base_layer) is None and super()._in_place_ok(name, result, x)

    def _one_node_ok(self, name: str, x: torch.Tensor) -> bool:
        return quantized_bits(self.base_layer) is None and super()._one_node_ok(name, x)


class IA3LinearQuantized(QuantizedMergeMixin, IA3Layer):
    """(IA)^3 on a bitsandbytes Linear4bit/Linear8bitLt: the vector is (out, 1), or (1, in) when feed-forward."""

    def __init__(self, base_layer: nn.Module, module_name: str = "", is_feedforward: bool = False) -> None:
        AdapterLayer.__init__(self, base_layer, module_name)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.transposed = False
        n_in, n_out = base_layer.in_features, base_layer.out_features
        self._shape = (1, n_in) if is_feedforward else (n_out, 1)

    def update_layer(self, adapter_name: str, config: IA3Config, init_weights: bool = True) -> None:
        init = torch.ones if config.init_ia3_weights else torch.randn
        device = self.base_layer.weight.device
        self.ia3_l[adapter_name] = nn.Parameter(init(self._shape, dtype=torch.float32, device=device))
        self.set_adapter(self.active_adapters or [adapter_name])


def quantized_layer_cls(target: nn.Module, kind: str) -> Any:
    """The adapter layer class for a bitsandbytes `target` ("lora" or "ia3"), or None if it is not one."""
    if quantized_bits(target) is None:
        return None
    return {"lora": LoraLinearQuantized, "ia3": IA3LinearQuantized}[kind]
