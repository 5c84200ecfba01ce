"""Inspecting and switching the adapter layers of a model: per-layer and whole-model status (HF peft's
`get_layer_status` / `get_model_status`, same dataclass fields), enabling/disabling every adapter layer, and
turning gradients on or off per adapter.

Works on a `PeftModel`, on a tuner, and on any `nn.Module` that had adapters injected in place
(`inject_adapter_in_model`). This module sits beside `peft_model.py` but never imports it: a PeftModel is
recognised by the tuner it holds as `base_model`. Switching layers on and off lives in `tuners/switching.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .inject import LINEAR_TYPES
from .tuners.base import AdapterLayer, BaseTuner
from .tuners.switching import adapter_modules as _adapter_modules
from .tuners.switching import tuner_of

Irregular = Literal["irregular"]  # layers disagree (e.g. an adapter is merged in some layers only)


@dataclass
class TunerLayerStatus:
    """The state of one adapter layer.

    Attributes:
        name: the layer's module name (under the tuner for a PeftModel, e.g. `model.model.layers.0.self_attn.q_proj`).
        module_type: method and layer kind, as HF peft names them (`"lora.Linear"`).
        enabled: False while adapters are disabled.
        active_adapters: adapters applied in forward.
        merged_adapters: adapters folded into the base weight.
        requires_grad: per adapter, True/False, or "irregular" when its tensors disagree.
        available_adapters: every adapter this layer holds (sorted).
        devices: per adapter, the device types its tensors are on (sorted).
        quantization_backend: the base layer's quantization library, or None.
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """The state of all adapter layers of a model, aggregated; a field is "irregular" when layers disagree.

    Attributes:
        base_model_type: class name of the wrapped model.
        adapter_model_type: class name of the tuner (`"LoraModel"`), or `"None"` for adapters injected in place.
        peft_types: adapter name -> method name (empty for adapters injected in place).
        trainable_params / total_params: parameter counts of the whole model.
        num_adapter_layers: how many adapter layers it holds.
        enabled, active_adapters, merged_adapters: as in `TunerLayerStatus`, or "irregular".
        requires_grad: per adapter, over every layer: True/False, or "irregular".
        available_adapters: every adapter any layer holds (sorted).
        devices: per adapter, the device types of its tensors (sorted).
        quantization_backend: the base layers' quantization library, None, or "irregular".
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


NO_LAYERS = (
    "No adapter layers found in the model: it is neither a PeftModel nor a model with adapters injected "
    "(get_peft_model / inject_adapter_in_model)"
)


def _status_root(model: nn.Module, caller: str) -> tuple[BaseTuner | None, nn.Module]:
    tuner = tuner_of(model)
    if tuner is not None and getattr(type(tuner), "is_prompt_learning", False):
        raise TypeError(
            f"{caller}(): {type(model).__name__} holds a prompt-learning adapter "
            f"({type(tuner).__name__}), which has no adapter layers to report on"
        )
    return tuner, (tuner if tuner is not None else model)


def module_type(layer: AdapterLayer) -> str:
    """`"lora.Linear"` for `peftkit.tuners.lora.LoraLinear`: the method file, then the layer kind (the class
    name without the method's prefix, or the base layer's kind for one class serving every kind)."""
    method = type(layer).__module__.rsplit(".", 1)[-1]
    for suffix in ("_layers", "_param"):  # a method's layers may live in tuners/<method>_<part>.py
        method = method.removesuffix(suffix)
    kind = type(layer).__name__
    if kind.lower().startswith(method.replace("_", "")):
        kind = kind[len(method.replace("_", "")) :]
    if kind in ("", "Layer"):
        kind = "Linear" if isinstance(layer.base_layer, LINEAR_TYPES) else type(layer.base_layer).__name__
    return f"{method}.{kind}"


def _quantization_backend(layer: AdapterLayer) -> str | None:
    library = type(layer.base_layer).__module__.split(".", 1)[0]
    return None if library in ("torch", "transformers") else library


def _requires_grad(params: list[Any]) -> bool | Irregular:
    flags = {p.requires_grad for p in params}
    return flags.pop() if len(flags) == 1 else "irregular"


def _layer_status(name: str, layer: AdapterLayer, tuner: BaseTuner | None) -> TunerLayerStatus:
    adapters = layer.adapter_names
    # A layer keeps only the active names it holds; HF peft reports the model's active adapters on every layer.
    active = tuner.active_adapters if tuner is not None else layer.active_adapters
    params = {a: list(layer.adapter_parameters(a)) for a in adapters}
    return TunerLayerStatus(
        name=name,
        module_type=module_type(layer),
        enabled=not layer.disable_adapters,
        active_adapters=list(active),
        merged_adapters=list(layer.merged_adapters),
        requires_grad={a: _requires_grad(ps) for a, ps in params.items() if ps},
        available_adapters=sorted(adapters),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items() if ps},
        quantization_backend=_quantization_backend(layer),
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One `TunerLayerStatus` per adapter layer of `model` (a PeftModel, a tuner, or a model with adapters
    injected in place).

    Raises:
        TypeError: `model` holds a prompt-learning adapter (it has no adapter layers).
        ValueError: `model` has no adapter layers at all.
    """
    tuner, root = _status_root(model, "get_layer_status")
    status = [_layer_status(name, layer, tuner) for name, layer in _adapter_modules(root)]
    if not status:
        raise ValueError(NO_LAYERS)
    return status


def _same_or_irregular(values: list[Any]) -> Any:
    first = values[0]
    return first if all(v == first for v in values[1:]) else "irregular"


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """The merged adapters, or "irregular" when an adapter is merged in some of the layers that hold it."""
    merged = sorted({a for s in layers for a in s.merged_adapters})
    for adapter in merged:
        if any(adapter in s.available_adapters and adapter not in s.merged_adapters for s in layers):
            return "irregular"
    return merged


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if callable(counter):
        return counter()
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    params = list(seen.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, aggregated over `get_layer_status(model)`.

    Raises:
        TypeError / ValueError: as `get_layer_status`.
    """
    tuner, root = _status_root(model, "get_model_status")
    layers = [_layer_status(name, layer, tuner) for name, layer in _adapter_modules(root)]
    if not layers:
        raise ValueError(NO_LAYERS)
    requires_grad: dict[str, list[Any]] = {}
    devices: dict[str, set[str]] = {}
    for layer in layers:
        for adapter, flag in layer.requires_grad.items():
            requires_grad.setdefault(adapter, []).append(flag)
        for adapter, types in layer.devices.items():
            devices.setdefault(adapter, set()).update(types)
    trainable, total = _count_parameters(model)
    base = tuner.model if tuner is not None else model
    return TunerModelStatus(
        base_model_type=type(base).__name__,
        adapter_model_type=type(tuner).__name__ if tuner is not None else "None",
        peft_types={k: str(c.peft_type) for k, c in tuner.peft_config.items()} if tuner is not None else {},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_same_or_irregular([s.enabled for s in layers]),
        active_adapters=_same_or_irregular([s.active_adapters for s in layers]),
        merged_adapters=_merged(layers),
        requires_grad={a: _same_or_irregular(flags) for a, flags in requires_grad.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(types) for a, types in devices.items()},
        quantization_backend=_same_or_irregular([s.quantization_backend for s in layers]),
    )
