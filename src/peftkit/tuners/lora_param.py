"""LoRA on a bare `nn.Parameter` (`LoraConfig.target_parameters`), e.g. the 3-D expert stacks of MoE models
(`mlp.experts.gate_up_proj` of shape (experts, out, in)) that no Linear layer holds.

The wrapper replaces the module that owns the parameter and runs that module with the parameter swapped for
`W + delta` (`torch.func.functional_call`), so whatever the module does with its weight sees the adapted one; the
update is a per-expert rank-r product (`functional.lora.stacked_delta`). Two parameters of one module give two
nested wrappers (the first-listed innermost), which is the key layout of HF peft's files.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..functional import lora as FL
from .lora_config import LoraConfig
from .lora_layers import LoraLayer


class LoraParameter(LoraLayer):
    """LoRA on the parameter `parameter_name` of `base_layer` (or of the module inside nested wrappers).

    A 3-D parameter is (experts, out, in) — or (experts, in, out) when the module sets `is_transposed` — and gets
    A (experts * r, in), B (out, r * experts); a 2-D one is (out, in) with A (r, in), B (out, r).
    """

    def __init__(self, base_layer: nn.Module, module_name: str, parameter_name: str) -> None:
        super().__init__(base_layer, module_name)
        self.parameter_name = parameter_name
        shape = self.weight.shape
        if len(shape) not in (2, 3):
            raise ValueError(
                f"target_parameters: {module_name}.{parameter_name} has shape {tuple(shape)}; LoRA applies to 2-D "
                "(out, in) or 3-D (experts, out, in) parameters"
            )
        self.experts = shape[0] if len(shape) == 3 else 1
        self.transposed = len(shape) == 3 and bool(getattr(self._owner(), "is_transposed", False))
        d1, d2 = shape[-2], shape[-1]
        self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)

    def _owner(self) -> nn.Module:
        """The module that registers the parameter (inside any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def _path(self) -> str:
        """The parameter's name relative to `base_layer`."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoraParameter):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    @property
    def weight(self) -> torch.Tensor:
        """The targeted parameter (what merging writes into)."""
        return getattr(self._owner(), self.parameter_name)

    def update_layer(self, adapter_name: str, config: LoraConfig, init_weights: bool = True) -> None:
        bad = {
            "lora_dropout": config.lora_dropout > 0,
            "use_dora": config.use_dora,
            "lora_bias": config.lora_bias,
            "init_lora_weights": config.init_lora_weights not in (True, False, "gaussian"),
        }
        if any(bad.values()):
            raise ValueError(
                f"LoRA on the parameter {self.module_name}.{self.parameter_name} (target_parameters) does not "
                f"support {[k for k, v in bad.items() if v]}: dropout cannot be applied to a weight, and DoRA, "
                "lora_bias and the PiSSA/OLoRA inits are defined for layers"
            )
        super().update_layer(adapter_name, config, init_weights)

    def _create(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.experts, self.out_features, bias=False)

    def _init_weights(self, adapter_name: str, init: bool | str, config: LoraConfig | None = None) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def _adapter_dtype(self) -> torch.dtype:
        w = self.weight
        return (
            torch.float32
            if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point()
            else w.dtype
        )

    def _to_base_device(self, adapter_name: str) -> None:
        for attr in ("lora_A", "lora_B"):
            getattr(self, attr)[adapter_name].to(device=self.weight.device, dtype=self._adapter_dtype())

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """In the parameter's own layout: (experts, out, in), (experts, in, out) if transposed, or (out, in)."""
        A, B, s = (
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scaling[adapter_name],
        )
        if self.experts == 1 and self.weight.dim() == 2:
            return FL.linear_delta(A, B, s)
        delta = FL.stacked_delta(A, B, s, self.experts)
        return delta.transpose(-2, -1) if self.transposed else delta

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the owning module with the parameter replaced by W + the active adapters' deltas."""
        names = self._active_unmerged()
        if not names:
            return self.base_layer(*args, **kwargs)
        w = self.weight
        adapted = w + sum(self.delta_weight(n).to(w.dtype) for n in names)
        return torch.func.functional_call(self.base_layer, {self._path(): adapted}, args, kwargs)


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str, init_weights: bool) -> None:
    """Wrap every parameter `config.target_parameters` names (a full name or a `.`-suffix of one)."""
    wanted = list(config.target_parameters)
    hits: list[tuple[str, str]] = []
    for name, _ in model.named_parameters():
        if ".lora_" in name:
            continue
        logical = name.replace(".base_layer.", ".")  # wrappers insert `base_layer` levels
        if any(logical == t or logical.endswith("." + t) for t in wanted):
            hits.append(tuple(logical.rsplit(".", 1)))  # type: ignore[arg-type]
    if not hits:
        sample = [n for n, p in model.named_parameters() if p.dim() >= 2 and ".lora_" not in n][:8]
        raise ValueError(
            f"target_parameters {wanted} match no parameter of {type(model).__name__}; give full names or "
            f"`.`-suffixes of names such as {sample}"
        )
    for module_path, param_name in hits:
        parent_path, _, child = module_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, child)
        layer = module
        while isinstance(layer, LoraParameter) and layer.parameter_name != param_name:
            layer = layer.base_layer
        if not isinstance(layer, LoraParameter):
            layer = LoraParameter(module, module_path, param_name)
            setattr(parent, child, layer)
        layer.update_layer(adapter_name, config, init_weights)


def strip_parameter_wrappers(model: nn.Module) -> None:
    """Replace every remaining `LoraParameter` by the module it wraps (nested ones included)."""
    for key, module in list(model.named_modules()):
        if isinstance(module, LoraParameter):
            inner = module._owner()
            parent_path, _, child = key.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, inner)
            return strip_parameter_wrappers(model)
    return None
