"""Adapters of different methods in one model (HF peft's `MixedModel`, the tuner under `PeftMixedModel`).

Each adapter is injected by its own method's tuner logic (`resolve_config` / `create_layer` of the registered
tuner class); a module that already carries another method's layer is wrapped again, so layers nest:
`q_proj = OFT(LoHa(LoRA(Linear)))` when LoRA, LoHa and OFT adapters are added in that order, each layer's
`base_layer` the previous one (HF peft's layout and in-memory keys). A layer of the *same* method as the
outermost one gets the new adapter added to it instead. The forward runs outermost first down to the base
(`outer.forward` calls `base_layer(x)`), so OFT, which rotates its input, sees the layers below it; merging
goes innermost first for the same reason.

Adapter files are the single-method files HF peft writes: `file_key_map` drops the `base_layer.` levels that
nesting adds, so an adapter loads from (and saves to) the same keys as in a one-method `PeftModel`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import PeftConfig
from ..inject import find_targets, get_submodule_parent
from ..io import adapter_key_map
from ..registry import get_method
from .base import AdapterLayer, BaseTuner, _targets_as_set

COMPATIBLE_TUNER_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "OFT")


def layer_class(peft_type: str) -> type[AdapterLayer]:
    """The adapter-layer class of a method that can be mixed (a layer of this class takes more adapters)."""
    from .adalora import AdaLoraLayer
    from .loha import LoHaLayer
    from .lokr import LoKrLayer
    from .lora_layers import LoraLayer
    from .oft import OFTLayer

    return {
        "LORA": LoraLayer,
        "ADALORA": AdaLoraLayer,
        "LOHA": LoHaLayer,
        "LOKR": LoKrLayer,
        "OFT": OFTLayer,
    }[peft_type]


def check_mixable(config: PeftConfig) -> None:
    """Raise unless `config` is of a method (and uses only options) that a mixed model supports."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type not in COMPATIBLE_TUNER_TYPES:
        raise ValueError(
            f"A {peft_type} adapter cannot be mixed with other methods in one model; PeftMixedModel takes "
            f"{', '.join(COMPATIBLE_TUNER_TYPES)} adapters (as HF peft)"
        )
    for option in ("layer_replication", "target_parameters", "trainable_token_indices", "modules_to_save"):
        if getattr(config, option, None):
            raise ValueError(
                f"{type(config).__name__}({option}=...) is not supported in a PeftMixedModel; use a one-method "
                "PeftModel (get_peft_model without mixed=True) for it"
            )


class _MethodView(BaseTuner):
    """A method's tuner logic (`resolve_config`, `create_layer`) run against the mixed model's state, without
    injecting anything itself: built with `view(tuner_cls, mixed)`."""

    @staticmethod
    def view(tuner_cls: type[BaseTuner], mixed: MixedModel) -> BaseTuner:
        tuner = tuner_cls.__new__(tuner_cls)
        nn.Module.__init__(tuner)
        tuner.__dict__["model"] = mixed.model  # not registered: the mixed tuner owns the model
        tuner.peft_config = mixed.peft_config
        tuner.active_adapter = mixed.active_adapter
        return tuner


class MixedModel(BaseTuner):
    """Holds adapters of several methods (see the module docstring); `peft_config` maps adapter -> its config."""

    prefix = ""

    def inject_adapter(self, config: PeftConfig, adapter_name: str, init_weights: bool = True) -> None:
        """Add `adapter_name` with its method's layers, wrapping modules another method already adapted."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete it first")
        check_mixable(config)
        peft_type = str(getattr(config.peft_type, "value", config.peft_type))
        method = _MethodView.view(get_method(peft_type).tuner_cls, self)
        config = method.resolve_config(config)
        keys = find_targets(self.model, config, wrapper_types=(AdapterLayer,))
        config = _targets_as_set(config)
        own = layer_class(peft_type)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for key in keys:
            parent, target, child_name = get_submodule_parent(self.model, key)
            if isinstance(target, own):
                target.update_layer(adapter_name, config, init_weights=init_weights)
                continue
            inner = target.get_base_layer() if isinstance(target, AdapterLayer) else target
            layer = method.create_layer(inner, config, adapter_name, key, init_weights)
            if inner is not target:  # nest: the new layer's base is the existing adapter layer
                layer.base_layer = target
            setattr(parent, child_name, layer)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)

    # ----- merging and unloading: innermost layer first ------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge every layer, the innermost of a nest first (so an outer OFT rotates the merged inner update,
        exactly as its forward rotates the inner layer's input)."""
        layers = [layer for _, layer in self.adapter_layers()][::-1]
        if safe_merge:
            for layer in layers:
                layer.check_merge(adapter_names)
        try:
            for layer in layers:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        except ValueError:
            self.unmerge_adapter()
            raise

    def _unload(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Replace each (outermost) adapter layer by the original module below the whole nest."""
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        done: list[str] = []
        for key, layer in list(self.adapter_layers()):
            if any(key.startswith(d + ".") for d in done):
                continue
            parent, _, child_name = get_submodule_parent(self.model, key)
            setattr(parent, child_name, layer.get_base_layer())
            done.append(key)
        self.peft_config.clear()
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's tensors (a layer left empty stays, passing its input through, as in HF peft)."""
        super().delete_adapter(adapter_name)
        remaining = [n for n in self.active_adapters if n in self.peft_config]
        self.active_adapter = remaining or list(self.peft_config)[:1]

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "add_weighted_adapter combines adapters of one method; not in a mixed model"
        )


def file_key_map(root: nn.Module, adapter_name: str) -> dict[str, str]:
    """{in-memory key: file key} for `adapter_name` under `root`, with the `base_layer.` levels that nesting
    adds removed from the file keys (`...q_proj.base_layer.lora_A.weight` -> `...q_proj.lora_A.weight`): the
    keys of the same adapter in a one-method model, which HF peft reads and writes."""
    nested = {
        path
        for path, module in root.named_modules()
        if isinstance(module, AdapterLayer) and isinstance(module.base_layer, AdapterLayer)
    }
    out: dict[str, str] = {}
    for mem, disk in adapter_key_map(root, adapter_name).items():
        for path in sorted(nested, key=len, reverse=True):
            if disk.startswith(path + ".base_layer."):
                disk = path + disk[len(path) + len(".base_layer") :]
        out[mem] = disk
    return out
