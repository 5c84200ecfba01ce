"""What LoHa and LoKr share (HF peft's `LycorisConfig` / `LycorisLayer` / `LycorisTuner`): rank and alpha per
module, scaling `alpha / r`, rank and module dropout, and a forward that runs the dense update as a second
Linear/Conv2d on the same input. No method is registered here; `loha.py` and `lokr.py` are the methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..functional import lycoris as FY
from ..inject import resolve_target_modules
from .base import AdapterLayer, BaseTuner
from .config_checks import check_fields, pattern_value


@dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share (names and defaults as in HF peft).

    Attributes:
        rank_pattern / alpha_pattern: per-module r / alpha, keyed by a name or regex suffix.
        r: rank of each low-rank factor (> 0).
        alpha: scaling numerator: the update is scaled by `alpha / r`.
        rank_dropout: probability of dropping an output row of the update during training.
        module_dropout: probability of skipping the whole update during training.
        use_effective_conv2d: factor Conv2d kernels with a Tucker core (r, r, kh, kw) instead of flattening them.
        target_modules: Linear/Conv2d names (exact or `.`-suffix), a regex, `"all-linear"`, or None for the
            architecture's default.
        exclude_modules: names or a regex of modules never to adapt.
        init_weights: True makes the update start at zero; False initialises every factor randomly.
        layers_to_transform / layers_pattern: restrict to some block indices.
        modules_to_save: extra modules trained in full and saved with the adapter.
    """

    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive_ints=("r",), probabilities=("rank_dropout", "module_dropout"))

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)


def kaiming_(t: torch.Tensor) -> None:
    """PyTorch's default Linear init (what the LyCORIS factors start from)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LycorisLayer(AdapterLayer):
    """Shared state and forward; subclasses create their factors (`_create`) and rebuild the update (`_delta`).

    The base is an `nn.Linear` (weight (out, in)) or `nn.Conv2d` (weight (out, in / groups, kh, kw)).
    """

    rank_dropout_scale_default = True  # LoHa always rescales after rank dropout; LoKr only if asked

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        for attr in self.adapter_attrs:
            setattr(self, attr, nn.ParameterDict())

    def _create(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        """Add the adapter's (uninitialised) factors."""
        raise NotImplementedError

    def _init(self, adapter_name: str, init: bool | str) -> None:
        raise NotImplementedError

    def _delta(self, adapter_name: str) -> torch.Tensor:
        """The update, reshaped by the caller to the base weight's shape."""
        raise NotImplementedError

    def _conv_effective(self, config: LycorisConfig) -> bool:
        """Tucker-factor the kernel: asked for, and a Conv2d/Conv1d whose kernel is not all ones (a 1x1 or
        size-1 kernel is a Linear over channels and stays flattened, as in HF peft)."""
        base = self.get_base_layer()
        conv = isinstance(base, (nn.Conv2d, nn.Conv1d))
        return config.use_effective_conv2d and conv and any(k != 1 for k in base.kernel_size)

    def _tucker_kernel(self) -> tuple[int, int]:
        """The Tucker core's kernel dims: (kh, kw) for a Conv2d, (k, 1) for a Conv1d (HF peft's layout)."""
        return (*self.base_layer.weight.shape[2:], 1)[:2]

    def update_layer(self, adapter_name: str, config: LycorisConfig, init_weights: bool = True) -> None:
        r = config.rank_for(self.module_name)
        self.r[adapter_name], self.alpha[adapter_name] = r, config.alpha_for(self.module_name)
        self.scaling[adapter_name] = self.alpha[adapter_name] / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = getattr(
            config, "rank_dropout_scale", self.rank_dropout_scale_default
        )
        self.module_dropout[adapter_name] = config.module_dropout
        self._create(adapter_name, r, config)
        with torch.no_grad():
            self._init(adapter_name, config.init_weights)
        w = self.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name in container:
                container[adapter_name] = nn.Parameter(container[adapter_name].data.to(w.device, dtype))
        self.set_adapter(self.active_adapters or [adapter_name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update, shaped like the base weight."""
        return self._delta(adapter_name).reshape(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) -> (..., out) for Linear; (N, in, H, W) -> (N, out, H', W') for Conv2d."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_unmerged():
            if (
                self.training
                and self.module_dropout[name]
                and torch.rand(1).item() < self.module_dropout[name]
            ):
                continue
            delta = self.delta_weight(name)
            if self.training and self.rank_dropout[name]:
                delta = FY.rank_dropout(delta, self.rank_dropout[name], self.rank_dropout_scale[name])
            result = result + FY.apply_delta(x.to(delta.dtype), delta, self.get_base_layer()).to(result.dtype)
        return result


class LycorisTuner(BaseTuner):
    """Injects a LyCORIS method's layers into Linear, Conv2d and Conv1d targets."""

    layer_cls: type[LycorisLayer]
    default_targets: dict[str, list[str]]
    method_name: str = ""

    def resolve_config(self, config: LycorisConfig) -> LycorisConfig:
        return resolve_target_modules(self.model, config, self.default_targets)

    def create_layer(
        self, target: nn.Module, config: LycorisConfig, adapter_name: str, key: str, init_weights: bool = True
    ) -> LycorisLayer:
        if not isinstance(target, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            raise ValueError(
                f"Target module {key!r} is a {type(target).__name__}; {self.method_name} supports nn.Linear, "
                "nn.Conv2d and nn.Conv1d (not GPT-2's Conv1D, as in HF peft). Narrow target_modules so it matches "
                "only those."
            )
        layer = self.layer_cls(target, key)
        layer.update_layer(adapter_name, config, init_weights)
        layer.set_adapter(
            self.active_adapters if adapter_name not in self.active_adapters else [adapter_name]
        )
        return layer
