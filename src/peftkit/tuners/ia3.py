"""(IA)^3 (Liu et al. 2022, "Infused Adapter by Inhibiting and Amplifying Inner Activations") on Linear,
GPT-2 Conv1D and Conv2d.

Each adapted layer learns one vector `ia3_l` that rescales its output features, or, for the layers named in
`feedforward_modules`, its input features. Merging multiplies the weight (and, for output scaling, the bias)
by the vector; unmerging divides. All math lives in `functional/ia3.py`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..functional import ia3 as FI
from ..inject import (
    IA3_DEFAULT_FEEDFORWARD,
    IA3_DEFAULT_TARGETS,
    LINEAR_TYPES,
    Conv1D,
    default_targets,
    resolve_target_modules,
)
from ..registry import register_peft_method
from .base import AdapterLayer, BaseTuner
from .config_checks import check_fields


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (field names and defaults as in HF peft's `IA3Config`).

    Attributes:
        target_modules: module names (exact or `.`-suffix), a regex matched against the full name,
            `"all-linear"`, or None for the architecture's default (e.g. Llama: k_proj, v_proj, down_proj).
        exclude_modules: names or a regex of modules never to adapt.
        feedforward_modules: the targets whose *input* is scaled (a name list, matched as a plain suffix of the
            module name as HF peft does, or a regex); must be a subset of target_modules. None: the
            architecture's default (e.g. Llama: down_proj; T5: wo).
        fan_in_fan_out: kept for file compatibility; the layout is read from the layer type.
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_ia3_weights: True starts every vector at 1 (the model is unchanged); False draws them from N(0, 1).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "IA3"
        check_fields(self, name_lists=("target_modules", "exclude_modules", "feedforward_modules"))
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list):
            # HF peft demands a literal subset, yet writes "all-linear" resolved to full module names; a
            # feed-forward name that is a suffix of some target is accepted so such files load.
            stray = [f for f in ff if not any(t == f or t.endswith(f) for t in targets)]
            if stray:
                raise ValueError(
                    f"IA3Config: feedforward_modules {stray} are not among target_modules {targets}; "
                    "feedforward_modules must be a subset of target_modules"
                )

    def is_feedforward(self, module_name: str) -> bool:
        """Whether `module_name` gets its input (not output) scaled: a regex must match the whole name; a list
        entry must be a plain suffix of it (HF peft's rule, so both libraries pick the same layers)."""
        ff = self.feedforward_modules or []
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(name) for name in ff)


class IA3Layer(AdapterLayer):
    """(IA)^3 around a Linear (weight (out, in)), GPT-2 Conv1D (weight (in, out)) or Conv2d.

    Attributes:
        ia3_l: one vector per adapter, shaped as in `functional/ia3.py`.
        is_feedforward: True when the vector scales the layer's input.
    """

    adapter_attrs = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, module_name: str = "", is_feedforward: bool = False) -> None:
        super().__init__(base_layer, module_name)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.transposed = isinstance(Conv1D, type) and isinstance(base_layer, Conv1D)
        w = base_layer.weight
        if isinstance(base_layer, nn.Conv2d):
            if is_feedforward and base_layer.groups != 1:
                raise ValueError(
                    f"(IA)^3 feed-forward scaling of a grouped Conv2d (groups={base_layer.groups}) is not "
                    f"supported ({module_name}); leave it out of feedforward_modules"
                )
            n = base_layer.in_channels if is_feedforward else base_layer.out_channels
            self._shape: tuple[int, ...] = (1, n, 1, 1)
        else:
            in_f, out_f = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
            self._shape = (1, in_f) if is_feedforward else (out_f, 1)

    def update_layer(self, adapter_name: str, config: IA3Config, init_weights: bool = True) -> None:
        w = self.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        init = torch.ones if config.init_ia3_weights else torch.randn
        self.ia3_l[adapter_name] = nn.Parameter(init(self._shape, dtype=dtype, device=w.device))
        self.set_adapter(self.active_adapters or [adapter_name])

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, Any]:
        return FI.merge(weight, self.ia3_l[adapter_name], self.is_feedforward, self.transposed), None

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str, state: Any) -> torch.Tensor:
        return FI.unmerge(weight, self.ia3_l[adapter_name], self.is_feedforward, self.transposed)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        """Output scaling also scales the bias: multiply on merge, divide on unmerge."""
        bias = self.bias
        if self.is_feedforward or bias is None:
            return
        vec = self.ia3_l[adapter_name].detach().flatten().to(bias.dtype)
        with torch.no_grad():
            bias.data = bias.data * vec if sign > 0 else bias.data / (vec + FI.UNMERGE_EPS)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) or (N, in, H, W) -> (..., out) or (N, out, H', W')."""
        names = self._active_unmerged()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            h = x
            for name in names:
                h = FI.scale(h.to(self.ia3_l[name].dtype), self.ia3_l[name])
            return self.base_layer(h.to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out = result
        for name in names:
            out = FI.scale(out.to(self.ia3_l[name].dtype), self.ia3_l[name])
        return out.to(result.dtype)


class IA3Model(BaseTuner):
    """Injects (IA)^3 layers into a model (HF peft's `IA3Model`)."""

    prefix = "ia3_"

    def resolve_config(self, config: IA3Config) -> IA3Config:
        config = resolve_target_modules(self.model, config, IA3_DEFAULT_TARGETS)
        if config.feedforward_modules is None:
            ff = default_targets(self.model, IA3_DEFAULT_FEEDFORWARD, field="feedforward_modules")
            config = dataclasses.replace(config, feedforward_modules=ff)
        return config

    def create_layer(
        self, target: nn.Module, config: IA3Config, adapter_name: str, key: str, init_weights: bool = True
    ) -> IA3Layer:
        if not isinstance(target, (*LINEAR_TYPES, nn.Conv2d)):
            raise ValueError(
                f"Target module {key!r} is a {type(target).__name__}; (IA)^3 supports Linear, Conv1D and Conv2d. "
                "Narrow target_modules (e.g. add exclude_modules) so it matches only those."
            )
        from .bnb_layers import quantized_layer_cls

        cls = quantized_layer_cls(target, "ia3") or IA3Layer  # bitsandbytes 4/8-bit bases
        layer = cls(target, key, is_feedforward=config.is_feedforward(key))
        layer.update_layer(adapter_name, config, init_weights)
        layer.set_adapter(
            self.active_adapters if adapter_name not in self.active_adapters else [adapter_name]
        )
        return layer


register_peft_method(peft_type="IA3", config_cls=IA3Config, tuner_cls=IA3Model, prefix="ia3_")
