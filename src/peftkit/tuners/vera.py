"""VeRA on Linear and GPT-2 Conv1D: shared frozen random projections, two trained vectors per layer.

The tuner owns the projections (`vera_A`, `vera_B`, one pair per adapter, sized for the largest targeted
layer and drawn from `projection_prng_key`); each layer holds a reference to them and its own
`vera_lambda_b` / `vera_lambda_d`. With `save_projection=True` (the default) the pair is written to the
adapter file as `base_model.vera_A` / `base_model.vera_B` (HF peft's keys); otherwise it is regenerated from
the seed on load. All math lives in `functional/vera.py`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..functional import vera as FV
from ..inject import DEFAULT_TARGETS, LINEAR_TYPES, Conv1D, find_targets, resolve_target_modules
from ..registry import register_peft_method
from .base import AdapterLayer, BaseTuner
from .config_checks import check_fields

VERA_DEFAULT_TARGETS = {**DEFAULT_TARGETS, "phi": ["q_proj", "v_proj"]}  # HF peft's VeRA table


@dataclass
class VeraConfig(PeftConfig):
    """Configuration of a VeRA adapter (field names and defaults as in HF peft's `VeraConfig`).

    Attributes:
        r: rows of the shared projection A (and columns of B); larger than a LoRA rank (default 256).
        target_modules: Linear/Conv1D names (exact or `.`-suffix), a regex, `"all-linear"`, or None for the
            architecture's default.
        projection_prng_key: seed of the shared random projections.
        save_projection: write the projections into the adapter file (exact reload everywhere); False
            regenerates them from the seed on load.
        vera_dropout: dropout probability on the VeRA branch input, in [0, 1).
        d_initial: initial value of every `vera_lambda_d` entry.
        fan_in_fan_out: kept for file compatibility; the layout is read from the layer type.
        bias: "none"; "all" (every bias of the model trains and is saved) or "vera_only" (the biases of the
            adapted layers), as in HF peft.
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_weights: True: lambda_b = 0 (the model starts unchanged), lambda_d = d_initial. False: lambda_b = 1,
            lambda_d ~ N(0, 1).
        layers_to_transform / layers_pattern: restrict to some block indices, as for LoRA.
    """

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "VERA"
        check_fields(
            self,
            positive_ints=("r",),
            probabilities=("vera_dropout",),
            bias_modes=("none", "all", "vera_only"),
            name_lists=("target_modules",),
        )
        if not self.save_projection:
            warnings.warn(
                "VeraConfig(save_projection=False): vera_A/vera_B will be regenerated from projection_prng_key "
                "when loading, which relies on the same PRNG across torch versions and machines",
                stacklevel=3,
            )


class BufferDict(nn.Module):
    """Tensors keyed by adapter name, registered as (frozen) buffers; persistent ones are in `state_dict()`."""

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self.persistent = persistent

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def keys(self) -> Any:
        return self._buffers.keys()


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear (weight (out, in)) or Conv1D (weight (in, out))."""
    w = module.weight
    transposed = isinstance(Conv1D, type) and isinstance(module, Conv1D)
    return (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])


class VeraLayer(AdapterLayer):
    """VeRA around a Linear or Conv1D; `projections` is the tuner's (vera_A, vera_B) pair of BufferDicts."""

    adapter_attrs = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")

    def __init__(
        self, base_layer: nn.Module, module_name: str, projections: tuple[BufferDict, BufferDict]
    ) -> None:
        super().__init__(base_layer, module_name)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.transposed = isinstance(Conv1D, type) and isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = _in_out(base_layer)
        self.projections = projections  # a plain tuple: referenced here, owned (and saved) by the tuner
        # also registered here, as HF peft does, so state_dict() has `<layer>.vera_A.<adapter>` keys too
        self.vera_A, self.vera_B = projections

    def update_layer(self, adapter_name: str, config: VeraConfig, init_weights: bool = True) -> None:
        A, B = (p[adapter_name] for p in self.projections)
        if A.shape[1] < self.in_features or B.shape[0] < self.out_features or A.shape[0] != config.r:
            raise ValueError(
                f"VeRA projections of adapter {adapter_name!r} are A {tuple(A.shape)}, B {tuple(B.shape)}; "
                f"{self.module_name} needs r={config.r}, in >= {self.in_features}, out >= {self.out_features}"
            )
        w = self.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        if config.init_weights:
            b, d = torch.zeros(self.out_features), torch.full((config.r,), config.d_initial)
        else:
            b, d = torch.ones(self.out_features), torch.randn(config.r)
        self.vera_lambda_b[adapter_name] = nn.Parameter(b.to(w.device, dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(d.to(w.device, dtype))
        p = config.vera_dropout
        self.vera_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.set_adapter(self.active_adapters or [adapter_name])

    def _sliced(self, adapter_name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A (r, in) and B (out, r), on `like`'s device and dtype."""
        A, B = (p[adapter_name] for p in self.projections)
        return (
            A[:, : self.in_features].to(like.device, like.dtype),
            B[: self.out_features, :].to(like.device, like.dtype),
        )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """(out, in) for Linear, (in, out) for Conv1D."""
        d, b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        A, B = self._sliced(adapter_name, d)
        dw = FV.delta(A, B, d, b)
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_unmerged():
            d, b = self.vera_lambda_d[name], self.vera_lambda_b[name]
            A, B = self._sliced(name, d)
            xd = self.vera_dropout[name](x.to(d.dtype))
            result = result + FV.apply(xd, A, B, d, b).to(result.dtype)
        return result


class VeraModel(BaseTuner):
    """Injects VeRA layers into a model (HF peft's `VeraModel`); owns the shared projections."""

    prefix = "vera_lambda_"
    layer_cls = VeraLayer  # bias="vera_only": these layers' biases train

    @property
    def shared_adapter_attrs(self) -> tuple[str, ...]:
        """The tuner-level adapter tensors written to the file (none when projections are not saved)."""
        return ("vera_A", "vera_B") if "vera_A" in self._modules and self.vera_A.persistent else ()

    def resolve_config(self, config: VeraConfig) -> VeraConfig:
        return resolve_target_modules(self.model, config, VERA_DEFAULT_TARGETS)

    def inject_adapter(self, config: VeraConfig, adapter_name: str, init_weights: bool = True) -> None:
        """Draw the adapter's projections (sized for its largest target) before wrapping the targets."""
        for other in self.peft_config.values():
            if (other.projection_prng_key, other.save_projection) != (
                config.projection_prng_key,
                config.save_projection,
            ):
                raise ValueError(
                    "VeRA adapters in one model must share projection_prng_key and save_projection; got "
                    f"{(config.projection_prng_key, config.save_projection)} after "
                    f"{(other.projection_prng_key, other.save_projection)}"
                )
        resolved = self.resolve_config(config)
        dims = [_in_out(self._unwrapped(key)) for key in find_targets(self.model, resolved, (AdapterLayer,))]
        if "vera_A" not in self._modules:
            self.vera_A = BufferDict(persistent=config.save_projection)
            self.vera_B = BufferDict(persistent=config.save_projection)
        A, B = FV.projections(
            config.r, max(i for i, _ in dims), max(o for _, o in dims), config.projection_prng_key
        )
        device = next(self.model.parameters()).device
        self.vera_A[adapter_name], self.vera_B[adapter_name] = A.to(device), B.to(device)
        super().inject_adapter(config, adapter_name, init_weights)

    def _unwrapped(self, key: str) -> nn.Module:
        module = self.model.get_submodule(key)
        return module.base_layer if isinstance(module, AdapterLayer) else module

    def create_layer(
        self, target: nn.Module, config: VeraConfig, adapter_name: str, key: str, init_weights: bool = True
    ) -> VeraLayer:
        if not isinstance(target, LINEAR_TYPES):
            raise ValueError(
                f"Target module {key!r} is a {type(target).__name__}; VeRA supports Linear and Conv1D. Narrow "
                "target_modules (e.g. add exclude_modules) so it matches only those."
            )
        layer = VeraLayer(target, key, (self.vera_A, self.vera_B))
        layer.update_layer(adapter_name, config, init_weights)
        layer.set_adapter(
            self.active_adapters if adapter_name not in self.active_adapters else [adapter_name]
        )
        return layer

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for shared in (self.vera_A, self.vera_B):
            if adapter_name in shared:
                del shared[adapter_name]


register_peft_method(peft_type="VERA", config_cls=VeraConfig, tuner_cls=VeraModel, prefix="vera_lambda_")
