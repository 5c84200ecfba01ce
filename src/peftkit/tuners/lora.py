"""LoRA (and its variants rsLoRA, DoRA, PiSSA/OLoRA init) on Linear, GPT-2 Conv1D, Embedding and Conv2d.

The variants are config values: `use_rslora` changes the scaling, `use_dora` adds a magnitude vector and
uses `functional.lora.dora_*`, `init_lora_weights` picks an initialisation. The config lives in
`lora_config.py`, the layers (one class per base-layer kind) in `lora_layers.py`; all math in
`functional/lora.py`. This module holds the tuner and the one registration.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..inject import LINEAR_TYPES, all_linear_names, default_targets, replicate_layers
from ..registry import register_peft_method
from .base import BaseTuner
from .lora_config import LoraConfig
from .lora_layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .lora_param import LoraParameter, inject_parameters, strip_parameter_wrappers
from .trainable_tokens import add_token_adapters, unwrap_token_adapters

__all__ = [
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "LoraParameter",
]


class LoraModel(BaseTuner):
    """Injects LoRA layers into a model (HF peft's `LoraModel`)."""

    prefix = "lora_"
    layer_cls = (
        LoraLayer  # bias="lora_only": the biases of these layers train (BaseTuner.mark_extra_trainable)
    )

    def resolve_config(self, config: LoraConfig) -> LoraConfig:
        skip = config.modules_to_save or []
        if config.target_modules is None:
            return dataclasses.replace(config, target_modules=default_targets(self.model))
        if config.target_modules == "all-linear":
            return dataclasses.replace(config, target_modules=all_linear_names(self.model, skip=skip))
        return config

    def create_layer(
        self, target: nn.Module, config: LoraConfig, adapter_name: str, key: str, init_weights: bool = True
    ) -> LoraLayer:
        from .bnb_layers import quantized_layer_cls

        quantized = quantized_layer_cls(target, "lora")  # bitsandbytes 4/8-bit bases (QLoRA)
        if quantized is not None:
            layer: LoraLayer = quantized(target, key)
        elif isinstance(target, nn.Embedding):
            layer = LoraEmbedding(target, key)
        elif isinstance(target, nn.Conv2d):
            layer = LoraConv2d(target, key)
        elif isinstance(target, LINEAR_TYPES):
            layer = LoraLinear(target, key)
        else:
            raise ValueError(
                f"Target module {key!r} is a {type(target).__name__}; LoRA supports Linear, Conv1D, Embedding "
                "and Conv2d. Narrow target_modules (e.g. add exclude_modules) so it matches only those."
            )
        layer.update_layer(adapter_name, config, init_weights)
        layer.set_adapter(
            self.active_adapters if adapter_name not in self.active_adapters else [adapter_name]
        )
        return layer

    def inject_adapter(self, config: LoraConfig, adapter_name: str, init_weights: bool = True) -> None:
        """LoRA layers (on the replicated block stack when `layer_replication` asks for one), then the trainable
        token rows `trainable_token_indices` asks for."""
        self._replicate(config)
        if config.target_modules or not config.target_parameters:
            super().inject_adapter(config, adapter_name, init_weights)
        else:  # parameters only: no module targets (HF peft: target_modules becomes an empty set)
            if adapter_name in self.peft_config:
                raise ValueError(
                    f"Adapter {adapter_name!r} already exists; pick another name or delete it first"
                )
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.peft_config[adapter_name] = dataclasses.replace(config, target_modules=[])
            object.__setattr__(self.peft_config[adapter_name], "target_modules", set())
        config = self.peft_config[adapter_name]
        if config.target_parameters:
            inject_parameters(self.model, config, adapter_name, init_weights)
        if config.trainable_token_indices is not None:
            targets = _token_targets(self.model, config.trainable_token_indices)
            add_token_adapters(self.model, targets, adapter_name, init_weights, wrapped=True)
        self.set_adapter(self.active_adapter)

    def _replicate(self, config: LoraConfig) -> None:
        """Apply `layer_replication` once, for the first adapter; later adapters must ask for the same map."""
        done = next((c.layer_replication for c in self.peft_config.values() if c.layer_replication), None)
        if done is not None or (self.peft_config and config.layer_replication):
            if config.layer_replication not in (None, done):
                raise ValueError(
                    f"layer_replication={config.layer_replication} differs from the model's existing "
                    f"{done}; every adapter of a model shares one block layout"
                )
            return
        if config.layer_replication:
            replicate_layers(self.model, config.layer_replication)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if any(c.layer_replication for c in self.peft_config.values()):
            raise ValueError(
                "Cannot merge LoRA into a model built with layer_replication: repeated blocks share their base "
                "weights, so a merge would give every copy the same update. Run it unmerged."
            )
        super().merge_adapter(adapter_names, safe_merge)

    def _unload(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        model = super()._unload(merge, safe_merge, adapter_names)
        strip_parameter_wrappers(model)  # nested wrappers (two parameters of one module) leave an inner one
        unwrap_token_adapters(model)
        return model


register_peft_method(peft_type="LORA", config_cls=LoraConfig, tuner_cls=LoraModel, prefix="lora_")


def _token_targets(model: nn.Module, spec: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """{full module name: token ids} for `trainable_token_indices` (a list means the input embedding)."""
    names = [n for n, _ in model.named_modules() if n]
    if not isinstance(spec, dict):
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        found = [n for n, m in model.named_modules() if n and m is embed]
        if not found:
            raise ValueError(
                "trainable_token_indices is a list but the model has no get_input_embeddings(); pass "
                "{embedding module name: [ids]} instead"
            )
        return {found[0]: list(spec)}
    out = {}
    for key, ids in spec.items():
        hits = [n for n in names if n == key or n.endswith("." + key)]
        if not hits:
            embeds = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            raise ValueError(
                f"trainable_token_indices names {key!r}, which is not in the model; embeddings: {embeds}"
            )
        out.update({h: list(ids) for h in hits})
    return out
