"""Switching the adapter layers of a model as a whole: enable/disable them all, gradients on or off per
adapter, and the names of the modules that carry adapters.

Works on a tuner and on any `nn.Module` with adapters injected in place; `BaseTuner` and `PeftModel` expose
these as methods (HF peft's `enable_adapter_layers`, `set_requires_grad`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

from ..modules_to_save import ModulesToSaveWrapper
from .base import AdapterLayer, BaseTuner


def tuner_of(model: nn.Module) -> BaseTuner | None:
    """The tuner of a PeftModel (its `base_model`), the model itself if it is a tuner, else None."""
    if isinstance(model, BaseTuner):
        return model
    inner = model.__dict__.get("_prompt_tuner") or model._modules.get(
        "base_model"
    )  # prompt learning: see PeftModel
    return inner if isinstance(inner, BaseTuner) else None


def adapter_modules(root: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name under `root`, layer) for every adapter layer, in model order."""
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


# ----- switching --------------------------------------------------------------------------------------------
def set_adapter_layers_enabled(root: nn.Module, enabled: bool) -> None:
    """Turn every adapter layer and trained module copy under `root` on or off.

    Off: merged layers are unmerged first (so the output is exactly the base model's) and no adapter tensor
    requires grad. On: the active adapters' tensors require grad again (inference-only ones excepted).
    """
    tuner = tuner_of(root)
    frozen = [n for n, c in tuner.peft_config.items() if c.inference_mode] if tuner is not None else []
    for _, layer in adapter_modules(root):
        layer.enable_adapters(enabled)
        if enabled and frozen:
            layer.set_requires_grad(frozen, False)
    for wrapper in root.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            wrapper.disable_adapters = not enabled


def set_requires_grad(
    root: nn.Module, adapter_names: str | Sequence[str], requires_grad: bool = True
) -> None:
    """Turn gradients of the named adapters' tensors (adapter layers and trained module copies) on or off;
    other adapters are left as they are. Names a layer does not hold are skipped."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for _, layer in adapter_modules(root):
        layer.set_requires_grad(names, requires_grad)
    for wrapper in root.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            for adapter in names:
                if adapter in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter].requires_grad_(requires_grad)


def has_active_enabled_adapter(root: nn.Module) -> bool:
    """True when some adapter layer is enabled and has an active adapter, i.e. the model's output is not
    simply the base model's."""
    return any(not layer.disable_adapters and layer.active_adapters for _, layer in adapter_modules(root))


def targeted_module_names(root: nn.Module) -> list[str]:
    """Names (under `root`) of the modules that carry an adapter layer, in model order."""
    return [name for name, _ in adapter_modules(root)]
