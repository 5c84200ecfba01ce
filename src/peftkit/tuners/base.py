"""The contracts every weight-changing method shares.

`AdapterLayer` wraps one frozen module as `base_layer` and holds each adapter's tensors in containers keyed
by adapter name (the names listed in `adapter_attrs`). Subclasses supply the method's math through
`delta_weight`/`merge_weight`/`unmerge_weight` and `forward`; merging is always explicit.

`BaseTuner` is the model-level object (HF peft's `LoraModel` and friends): it finds the target modules,
swaps them for adapter layers, and implements merge/unload/enable/disable over all of them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..inference_fold import drop_fold
from ..inject import find_targets, get_submodule_parent
from ..quantized import check_quantized_targets


class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus per-adapter tensors.

    Attributes:
        adapter_attrs: names of the ModuleDict/ParameterDict attributes keyed by adapter name; every adapter
            tensor lives under one of them (the adapter-file key mapping relies on this).
        active_adapters: names whose update is applied in `forward`.
        merged_adapters: names currently folded into `base_layer`'s weight.
        disable_adapters: when True, `forward` is exactly the base layer (after unmerging).
    """

    adapter_attrs: tuple[str, ...] = ()
    # the adapter is a trainable copy of the base layer (LN tuning): it keeps the base's dtype and device under
    # autocast_adapter_dtype/low_cpu_mem_usage, as in HF peft
    copies_base_layer: bool = False

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._unmerge_state: dict[str, Any] = {}
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ----- the method's hooks -------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: PeftConfig, init_weights: bool = True) -> None:
        """Create (or replace) the tensors of `adapter_name` from `config` (initialised unless `init_weights`
        is False, when loaded tensors will overwrite them)."""
        raise NotImplementedError

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, Any]:
        """Return (merged weight, state needed by `unmerge_weight`); weight is in base_layer's own layout."""
        return weight + self.delta_weight(adapter_name).to(weight.dtype), None

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str, state: Any) -> torch.Tensor:
        """Undo `merge_weight` given what it returned."""
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update of `adapter_name` in base_layer's weight layout."""
        raise NotImplementedError

    # ----- shared behaviour ----------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that reads `module.weight` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds tensors for."""
        names: list[str] = []
        for attr in self.adapter_attrs:
            for name in getattr(self, attr).keys():
                if name not in names:
                    names.append(name)
        return names

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        """The trainable tensors of one adapter."""
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                yield from item.parameters() if isinstance(item, nn.Module) else [item]

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        """Make these adapters active; their tensors require grad (if `trainable`), all others do not."""
        drop_fold(self)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(trainable and name in names)
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop every tensor of `adapter_name` (unmerging it first if needed)."""
        drop_fold(self)
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the given (default: active) adapters into the base weight.

        With `safe_merge`, the merged weight is computed on a copy and checked for NaN/inf before it replaces
        the base weight, so a broken adapter leaves the model untouched.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        weight = self.weight  # the merge target (LoRA on a bare parameter overrides `weight`)
        drop_fold(self)
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            with torch.no_grad():
                new_weight, state = self.merge_weight(weight.detach().clone(), name)
                if safe_merge:
                    self._check_finite(new_weight, name)
                weight.data.copy_(new_weight)
            self._merge_bias(name, +1)
            self._unmerge_state[name] = state
            self.merged_adapters.append(name)

    def _check_finite(self, merged: torch.Tensor, name: str) -> None:
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"safe_merge: merging adapter {name!r} into {self.module_name or type(self).__name__} "
                "gives NaN/inf weights; the model was left unmerged"
            )

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise as `merge(safe_merge=True)` would, without changing anything (each adapter checked alone)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        weight = self.base_layer.weight
        for name in names:
            if name not in self.merged_adapters and name in self.adapter_names:
                with torch.no_grad():
                    self._check_finite(self.merge_weight(weight.detach().clone(), name)[0], name)

    def unmerge(self) -> None:
        """Restore the base weight by undoing the merges, last first."""
        drop_fold(self)
        weight = self.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data.copy_(
                    self.unmerge_weight(weight.detach().clone(), name, self._unmerge_state.pop(name))
                )
            self._merge_bias(name, -1)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        """Methods with their own bias term fold it in here (none by default)."""

    def _active_unmerged(self) -> list[str]:
        """Adapters whose update `forward` must compute (active, present here, not merged)."""
        if self.disable_adapters:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters and n in self.adapter_names]

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"

    # ----- HF peft's BaseTunerLayer names that integrations call on a layer --------------------------------
    def get_base_layer(self) -> nn.Module:
        """The wrapped original module (through nested adapter layers of a mixed model, the innermost one)."""
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    def enable_adapters(self, enabled: bool) -> None:
        """Turn this layer's adapters on or off (off: unmerged first, so the output is the base layer's; the
        adapter tensors stop requiring grad; on: the active ones require grad again)."""
        drop_fold(self)
        if not enabled and self.merged:
            self.unmerge()
        self.disable_adapters = not enabled
        for name in self.adapter_names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(enabled and name in self.active_adapters)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' tensors in this layer on or off."""
        drop_fold(self)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(requires_grad)


class BaseTuner(nn.Module):
    """Owns the wrapped model (`self.model`) and the adapter layers injected into it.

    Subclasses set `prefix` and implement `create_layer` (a new wrapper for one target module).
    """

    prefix: str = ""

    def __init__(
        self, model: nn.Module, config: PeftConfig, adapter_name: str = "default", init_weights: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(config, adapter_name, init_weights=init_weights)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generation runs the wrapped model's (adapter layers apply inside it); prompt learning overrides this."""
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ----- injection ---------------------------------------------------------------------------------------
    def create_layer(
        self, target: nn.Module, config: PeftConfig, adapter_name: str, key: str, init_weights: bool = True
    ) -> AdapterLayer:
        """A new adapter layer wrapping `target`; `init_weights=False` when a file's tensors will overwrite it
        (so inits that rewrite the base weight, like PiSSA, are not applied twice)."""
        raise NotImplementedError

    def resolve_config(self, config: PeftConfig) -> PeftConfig:
        """Hook to fill model-dependent defaults (e.g. target modules); returns a new config."""
        return config

    def inject_adapter(self, config: PeftConfig, adapter_name: str, init_weights: bool = True) -> None:
        """Wrap every target module with an adapter layer for `adapter_name`."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete it first")
        config = self.resolve_config(config)
        keys = find_targets(self.model, config, wrapper_types=(AdapterLayer,))
        config = _targets_as_set(config)
        check_quantized_targets(self.model, keys, config.peft_type)  # before the model is touched
        for p in self.model.parameters():
            p.requires_grad_(False)
        for key in keys:
            parent, target, child_name = get_submodule_parent(self.model, key)
            if isinstance(target, AdapterLayer):
                target.update_layer(adapter_name, config, init_weights=init_weights)
            else:
                setattr(
                    parent, child_name, self.create_layer(target, config, adapter_name, key, init_weights)
                )
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)

    def place_adapter(
        self, adapter_name: str, autocast_adapter_dtype: bool = True, on_meta: bool = False
    ) -> None:
        """Put `adapter_name`'s tensors on their base layers' device and dtype, upcasting half precision to
        float32 when `autocast_adapter_dtype`; `on_meta` empties them onto the meta device instead (see
        `tuners/placement.py`). Shared tensors (VeRA's projections) follow the first adapted layer."""
        from .placement import place_tensors

        first_ref = None
        for _, layer in self.adapter_layers():
            if adapter_name not in layer.adapter_names or layer.copies_base_layer:
                continue
            ref = getattr(layer.base_layer, "weight", None)
            ref = ref if isinstance(ref, torch.Tensor) else None
            first_ref = ref if first_ref is None else first_ref
            place_tensors(layer, layer.adapter_attrs, adapter_name, ref, autocast_adapter_dtype, on_meta)
        shared = getattr(self, "shared_adapter_attrs", ())
        place_tensors(self, shared, adapter_name, first_ref, autocast_adapter_dtype, on_meta=False)

    def tensors_for_saving(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Hook: adjust an adapter's file tensors before they are written (AdaLoRA drops pruned ranks)."""
        return tensors

    def before_loading(self, adapter_name: str) -> None:
        """Hook: reshape an injected adapter to the saved one before its tensors are copied in."""

    def mark_extra_trainable(self, config: PeftConfig) -> None:
        """Make biases trainable as the config's `bias` asks (HF peft's rule for every method that has the field):
        "all": every bias of the model; "<method>_only" (`lora_only`, `vera_only`, ...): the biases of the layers
        this method adapted (`layer_cls`, any adapter layer when unset); "none" or inference mode: nothing."""
        bias = getattr(config, "bias", "none")
        if bias == "none" or config.inference_mode:
            return
        adapted = getattr(self, "layer_cls", AdapterLayer)
        for module in self.model.modules():
            param = getattr(module, "bias", None)
            if isinstance(param, nn.Parameter) and (bias == "all" or isinstance(module, adapted)):
                param.requires_grad_(True)

    # ----- adapter switching ---------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate adapter(s); only their tensors require grad (unless a config is inference-only)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        trainable = not all(self.peft_config[n].inference_mode for n in names if n in self.peft_config)
        for _, layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()
            layer.set_adapter(names, trainable=trainable)
        self.active_adapter = adapter_name
        for name in names:
            if name in self.peft_config:
                self.mark_extra_trainable(self.peft_config[name])

    def delete_adapter(self, adapter_name: str) -> None:
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]

    def set_adapter_layers_enabled(self, enabled: bool) -> None:
        for _, layer in self.adapter_layers():
            drop_fold(layer)
            layer.disable_adapters = not enabled

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model: every adapter layer skips its update (merged ones are unmerged first)."""
        for _, layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()
        self.set_adapter_layers_enabled(False)
        try:
            yield
        finally:
            self.set_adapter_layers_enabled(True)

    # ----- merging -----------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into every layer. A safe merge checks every layer before it changes any, so a failure leaves
        the base weights bit for bit as they were (merging then unmerging would round them)."""
        if safe_merge:
            for _, layer in self.adapter_layers():
                layer.check_merge(adapter_names)
        try:
            for _, layer in self.adapter_layers():
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        except ValueError:
            self.unmerge_adapter()
            raise

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def _unload(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Replace every adapter layer by its base layer (merged first if asked); returns the bare model."""
        if merge:
            self.merge_adapter(
                adapter_names=adapter_names, safe_merge=safe_merge
            )  # all-or-nothing check first
        for key, layer in list(self.adapter_layers()):
            parent, _, child_name = get_submodule_parent(self.model, key)
            if not merge:
                layer.unmerge()
            setattr(parent, child_name, layer.base_layer)
        self.peft_config.clear()
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold the active (or given) adapters into the weights and return the plain base model."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging; returns the original base model."""
        return self._unload(merge=False)

    # ----- HF peft's tuner-level switches and inspection (thin: the logic is in tuners/switching.py) ----------
    @property
    def targeted_module_names(self) -> list[str]:
        """Names (under `self.model`) of the modules that carry an adapter layer."""
        from .switching import targeted_module_names

        return targeted_module_names(self.model)

    def enable_adapter_layers(self) -> None:
        """Turn every adapter layer back on (the active adapters' tensors require grad again)."""
        from .switching import set_adapter_layers_enabled

        set_adapter_layers_enabled(self, True)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter layer off until `enable_adapter_layers`: the output is the base model's."""
        from .switching import set_adapter_layers_enabled

        set_adapter_layers_enabled(self, False)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters on (or off); other adapters are left as they are."""
        from .switching import set_requires_grad

        set_requires_grad(self, adapter_names, requires_grad)


def _targets_as_set(config: PeftConfig) -> PeftConfig:
    """A copy of `config` whose list of target module names is a set, as HF peft holds it after injection
    (user code does `"q_proj" in config.target_modules` or set algebra on it); files still write a sorted list.
    Bypasses `__post_init__`, which normalises to a list; the caller's config is left as it was."""
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, (list, tuple)):
        return config
    config = copy.copy(config)
    object.__setattr__(config, "target_modules", set(targets))
    return config
