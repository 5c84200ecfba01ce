"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): each adapter trains its own copy of
the model's normalisation layers (LayerNorm, RMSNorm, ...); everything else stays frozen.

There is no delta to compute: the forward runs the adapter's copy instead of the frozen original, and merging
swaps the copy in as the base layer (unmerging swaps it back), so both are exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..inject import LN_TUNING_DEFAULT_TARGETS, resolve_target_modules
from ..registry import register_peft_method
from .base import AdapterLayer, BaseTuner


@dataclass
class LNTuningConfig(PeftConfig):
    """Configuration of LayerNorm tuning (field names and defaults as in HF peft's `LNTuningConfig`).

    Attributes:
        target_modules: the norm modules to tune: names (exact or `.`-suffix), a regex matched against the full
            name, or None for the architecture's default (Llama: input_layernorm, post_attention_layernorm, norm;
            GPT-2: ln_1, ln_2, ln_f; T5: layer_norm, final_layer_norm).
        exclude_modules: names or a regex of modules never to tune.
        modules_to_save: extra modules trained in full and saved with the adapter.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LN_TUNING"
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))


class LNTuningLayer(AdapterLayer):
    """A frozen norm plus one trainable copy of it per adapter (`ln_tuning_layers[name]`).

    The copy has the base module's own signature: x (..., hidden) -> (..., hidden) for LayerNorm/RMSNorm.
    """

    adapter_attrs = ("ln_tuning_layers",)
    copies_base_layer = True

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.ln_tuning_layers = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: LNTuningConfig, init_weights: bool = True) -> None:
        if self.merged:  # copy the original norm, not a merged adapter's
            self.unmerge()
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(self.base_layer)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _swap(self, adapter_name: str) -> None:
        self.base_layer, self.ln_tuning_layers[adapter_name] = (
            self.ln_tuning_layers[adapter_name],
            self.base_layer,
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Make the adapter's trained copy the base layer (one adapter at a time: a norm has one set of values)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in names if n in self.adapter_names and n not in self.merged_adapters]
        if not names:
            return
        if len(names) > 1 or self.merged:
            merged = self.merged_adapters + names
            raise ValueError(
                f"LN tuning can merge only one adapter into {self.module_name or 'a layer'}, asked for {merged}"
            )
        copy_ = self.ln_tuning_layers[names[0]]
        if safe_merge and not all(torch.isfinite(p).all() for p in copy_.parameters()):
            raise ValueError(
                f"safe_merge: adapter {names[0]!r} has NaN/inf values in {self.module_name}; the model was left "
                "unmerged"
            )
        self._swap(names[0])
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        """Put the original norm back as the base layer."""
        while self.merged_adapters:
            self._swap(self.merged_adapters.pop())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Runs the active adapter's copy (or the base layer when disabled or merged); shapes as the base."""
        names = self._active_unmerged()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if len(names) > 1:
            raise ValueError(f"LN tuning runs one adapter at a time; active in {self.module_name}: {names}")
        return self.ln_tuning_layers[names[0]](x, *args, **kwargs)


class LNTuningModel(BaseTuner):
    """Injects LayerNorm-tuning layers into a model (HF peft's `LNTuningModel`)."""

    prefix = "ln_tuning_"

    def resolve_config(self, config: LNTuningConfig) -> LNTuningConfig:
        return resolve_target_modules(self.model, config, LN_TUNING_DEFAULT_TARGETS)

    def create_layer(
        self,
        target: nn.Module,
        config: LNTuningConfig,
        adapter_name: str,
        key: str,
        init_weights: bool = True,
    ) -> LNTuningLayer:
        if not any(True for _ in target.parameters()):
            raise ValueError(
                f"Target module {key!r} ({type(target).__name__}) has no parameters to tune; LN tuning targets "
                "normalisation layers with a weight (e.g. input_layernorm, ln_f, LayerNorm)"
            )
        layer = LNTuningLayer(target, key)
        layer.update_layer(adapter_name, config, init_weights)
        layer.set_adapter(
            self.active_adapters if adapter_name not in self.active_adapters else [adapter_name]
        )
        return layer


register_peft_method(
    peft_type="LN_TUNING", config_cls=LNTuningConfig, tuner_cls=LNTuningModel, prefix="ln_tuning_"
)
