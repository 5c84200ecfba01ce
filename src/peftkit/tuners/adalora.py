"""AdaLoRA: LoRA in SVD form whose rank is reallocated during training toward a total budget.

Call `model.base_model.update_and_allocate(step)` after `loss.backward()` each step (before zeroing
grads). The final allocation is stored in the config's `rank_pattern` ({"<module>.lora_E": [keep, ...]});
saving drops the pruned ranks and loading shrinks the layers to match, as HF peft does.
To stop and continue training exactly, `training_state()` / `load_training_state()` carry what the adapter
file does not: the allocator's importance scores and the unpruned tensors (masked ranks keep training).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..functional import adalora as FA
from ..inject import ADALORA_DEFAULT_TARGETS, LINEAR_TYPES, Conv1D, default_targets
from ..registry import register_peft_method
from .base import AdapterLayer
from .lora import LoraConfig, LoraModel


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings (HF peft's names and defaults) on top of LoraConfig's.

    Attributes:
        target_r: average rank per layer the budget shrinks to.
        init_r: starting rank of every layer.
        tinit / tfinal: steps of warm-up (full budget) and of final fine-tuning (fixed allocation).
        deltaT: steps between two reallocations.
        beta1 / beta2: EMA factors of the sensitivity and of its uncertainty.
        orth_reg_weight: weight of the orthogonality penalty added to the loss.
        total_step: total training steps (required: the budget schedule depends on it).
        rank_pattern: the allocation found by training ({"<module>.lora_E": [bool] * init_r}).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "ADALORA"
        if self.use_dora:
            raise ValueError("AdaLoraConfig: AdaLoRA does not support DoRA (use_dora=True)")
        if self.lora_bias:
            raise ValueError("AdaLoraConfig: AdaLoRA does not support lora_bias=True")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(
                f"AdaLoraConfig: total_step must be a positive number of steps, got {self.total_step!r}"
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"AdaLoraConfig: tinit ({self.tinit}) must be < total_step - tfinal ({self.total_step - self.tfinal}) "
                "so that there is a budget phase"
            )
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig: orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"AdaLoraConfig: {name} must be in (0, 1), got {getattr(self, name)}")
        if min(self.init_r, self.target_r) <= 0 or self.deltaT <= 0:
            raise ValueError("AdaLoraConfig: init_r, target_r and deltaT must be positive")

    def _validate_patterns(self) -> None:
        """AdaLoRA's rank_pattern holds keep-masks, not ranks."""


class AdaLoraLayer(AdapterLayer):
    """SVD-form LoRA on Linear or GPT-2 Conv1D. A (r, in), E (r, 1), B (out, r)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_E", "lora_dropout")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.transposed = isinstance(Conv1D, type) and isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        )
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        # a frozen parameter per adapter (not in adapter_attrs: never trained nor written to files), so
        # state_dict()/named_parameters() carry `...ranknum.<adapter>` as in HF peft
        self.ranknum = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: AdaLoraConfig, init_weights: bool = True) -> None:
        r = config.init_r
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        dtype = torch.float32 if self.base_layer.weight.dtype in (torch.float16, torch.bfloat16) else None
        factory = {"device": self.base_layer.weight.device, "dtype": dtype or self.base_layer.weight.dtype}
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, **factory))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, **factory))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, **factory))
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        # the normaliser stays init_r even after pruning
        self.ranknum[adapter_name] = nn.Parameter(torch.tensor(float(r), **factory), requires_grad=False)
        if init_weights and config.init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], std=0.02)
        self.set_adapter(self.active_adapters or [adapter_name])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.ranknum:  # not in adapter_attrs (never trained or saved), so dropped here
            del self.ranknum[adapter_name]

    def keep_ranks(self, adapter_name: str, keep: list[bool]) -> None:
        """Shrink an adapter to the ranks where `keep` (r,) is True (used when loading a pruned adapter)."""
        trainable = self.lora_A[adapter_name].requires_grad
        with torch.no_grad():
            for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                container = getattr(self, attr)
                kept = container[adapter_name].index_select(dim, kept_index(keep, container[adapter_name]))
                container[adapter_name] = nn.Parameter(kept, requires_grad=trainable)

    def set_full_ranks(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace A, E, B with `tensors` ({"lora_A": (r, in), ...}), e.g. the unpruned ones of a checkpoint."""
        trainable = self.lora_A[adapter_name].requires_grad
        for attr in ("lora_A", "lora_E", "lora_B"):
            container, value = getattr(self, attr), tensors[attr]
            like = container[adapter_name]
            container[adapter_name] = nn.Parameter(
                value.to(device=like.device, dtype=like.dtype).clone(), requires_grad=trainable
            )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        d = FA.svd_delta(
            self.lora_A[adapter_name],
            self.lora_E[adapter_name],
            self.lora_B[adapter_name],
            self.scaling[adapter_name],
            float(self.ranknum[adapter_name]),
        )
        return d.T if self.transposed else d

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_unmerged():
            A = self.lora_A[name]
            xa = self.lora_dropout[name](x.to(A.dtype))
            upd = FA.svd_forward(
                xa, A, self.lora_E[name], self.lora_B[name], self.scaling[name], float(self.ranknum[name])
            )
            result = result + upd.to(result.dtype)
        return result


class RankAllocator:
    """Tracks smoothed importance of every (A row, E value, B column) triplet and masks E to the budget."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, AdaLoraLayer], adapter_name: str) -> None:
        self.config, self.layers, self.adapter = config, layers, adapter_name
        self.init_budget = sum(layer.lora_E[adapter_name].shape[0] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def update_importance(self) -> None:
        """EMA of |p * grad| (sensitivity) and of its deviation (uncertainty) for A, E and B."""
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, layer in self.layers.items():
                for attr in ("lora_A", "lora_E", "lora_B"):
                    p = getattr(layer, attr)[self.adapter]
                    if p.grad is None:
                        continue
                    ipt = (p * p.grad).abs()
                    key = (path, attr)
                    sens = self.sensitivity.get(key, torch.zeros_like(p)) * b1 + (1 - b1) * ipt
                    unc = self.uncertainty.get(key, torch.zeros_like(p)) * b2 + (1 - b2) * (ipt - sens).abs()
                    self.sensitivity[key], self.uncertainty[key] = sens, unc

    def _score(self, path: str, attr: str) -> torch.Tensor:
        key = (path, attr)
        if key not in self.sensitivity:
            return getattr(self.layers[path], attr)[self.adapter].new_zeros(0)
        return self.sensitivity[key] * self.uncertainty[key]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of the least important triplets so `budget` ranks remain; returns the masks."""
        scores = {}
        for path in self.layers:
            if (path, "lora_E") not in self.sensitivity:
                return {}
            scores[path] = FA.triplet_scores(
                self._score(path, "lora_A"), self._score(path, "lora_E"), self._score(path, "lora_B")
            )
        k = self.init_budget - budget
        threshold = (
            torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else -float("inf")
        )
        pattern = {}
        with torch.no_grad():
            for path, layer in self.layers.items():
                keep = scores[path] > threshold
                layer.lora_E[self.adapter].masked_fill_(~keep.view(-1, 1), 0.0)
                pattern[f"{path}.lora_E"] = keep.tolist()
        return pattern

    def apply(self, pattern: dict[str, list[bool]]) -> None:
        """Re-apply a fixed allocation (final phase: pruned values stay zero)."""
        with torch.no_grad():
            for path, layer in self.layers.items():
                keep = torch.tensor(pattern[f"{path}.lora_E"], device=layer.lora_E[self.adapter].device)
                layer.lora_E[self.adapter].masked_fill_(~keep.view(-1, 1), 0.0)

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The importance EMAs, keyed "<module>.<lora_A|lora_E|lora_B>" (a checkpoint's part of the allocator)."""
        return {
            name: {f"{path}.{attr}": t.clone() for (path, attr), t in scores.items()}
            for name, scores in (("sensitivity", self.sensitivity), ("uncertainty", self.uncertainty))
        }

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of `state`; each tensor goes to its parameter's device."""
        self.reset()
        for name, target in (("sensitivity", self.sensitivity), ("uncertainty", self.uncertainty)):
            for key, value in state[name].items():
                path, _, attr = key.rpartition(".")
                if path not in self.layers:
                    raise ValueError(
                        f"AdaLoRA allocator state names module {path!r}, which has no AdaLoRA layer"
                    )
                target[(path, attr)] = value.to(getattr(self.layers[path], attr)[self.adapter].device)


def kept_index(keep: list[bool] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Positions (k,) of the True entries of `keep` (r,), on `like`'s device (index_select needs both there).

    Built from the host-side mask, so it also works for tensors on `meta`, whose values are unknown.
    """
    flags = keep.tolist() if isinstance(keep, torch.Tensor) else keep
    return torch.tensor([i for i, k in enumerate(flags) if k], dtype=torch.long, device=like.device)


class AdaLoraModel(LoraModel):
    """Injects AdaLoRA layers; owns the rank allocator of the (single) trainable adapter."""

    layer_cls = AdaLoraLayer  # bias="lora_only" trains these layers' biases (as HF peft)
    prefix = "lora_"

    def __init__(
        self,
        model: nn.Module,
        config: AdaLoraConfig,
        adapter_name: str = "default",
        init_weights: bool = True,
    ) -> None:
        super().__init__(model, config, adapter_name, init_weights=init_weights)
        self.rankallocator = RankAllocator(
            self.peft_config[adapter_name], self._svd_layers(adapter_name), adapter_name
        )

    def resolve_config(self, config: AdaLoraConfig) -> AdaLoraConfig:
        """AdaLoRA's own default targets (`inject.ADALORA_DEFAULT_TARGETS`); otherwise as LoRA."""
        if config.target_modules is None:
            return super().resolve_config(
                dataclasses.replace(
                    config, target_modules=default_targets(self.model, ADALORA_DEFAULT_TARGETS)
                )
            )
        return super().resolve_config(config)

    def _svd_layers(self, adapter_name: str) -> dict[str, AdaLoraLayer]:
        return {
            p: m for p, m in self.adapter_layers() if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_E
        }

    def create_layer(
        self, target: nn.Module, config: AdaLoraConfig, adapter_name: str, key: str, init_weights: bool = True
    ) -> AdaLoraLayer:
        if not isinstance(target, LINEAR_TYPES):
            raise ValueError(
                f"Target module {key!r} is a {type(target).__name__}; AdaLoRA supports Linear and Conv1D"
            )
        layer = AdaLoraLayer(target, key)
        layer.update_layer(adapter_name, config, init_weights)
        layer.set_adapter(self.active_adapters)
        return layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output, with the orthogonality penalty added to `loss` when there is one."""
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.active_adapters[0]
        weight = self.peft_config[name].orth_reg_weight if name in self.peft_config else 0
        if isinstance(loss, torch.Tensor) and weight > 0:
            layers = self._svd_layers(name).values()
            penalty = FA.orthogonal_penalty(
                [m.lora_A[name] for m in layers], [m.lora_B[name] for m in layers]
            )
            outputs.loss = loss + weight * penalty
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and reallocate ranks; call after backward, before zeroing grads."""
        name = self.active_adapters[0]
        config, alloc = self.peft_config[name], self.rankallocator
        final_start = config.total_step - config.tfinal
        if global_step < final_start:
            alloc.update_importance()
            budget, remask = FA.budget_at(
                global_step,
                alloc.init_budget,
                alloc.target_budget,
                config.tinit,
                config.tfinal,
                config.total_step,
                config.deltaT,
            )
            pattern = alloc.mask_to_budget(budget) if remask else {}
        elif global_step == final_start:
            pattern = alloc.mask_to_budget(alloc.target_budget)
            alloc.reset()
        else:
            if config.rank_pattern:
                alloc.apply(config.rank_pattern)
            return
        if pattern:
            self.peft_config[name] = dataclasses.replace(config, rank_pattern=pattern)
            alloc.config = self.peft_config[name]

    def tensors_for_saving(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Drop pruned ranks, as the reference does, so files are small and interchangeable."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return tensors
        out = dict(tensors)
        for key, keep in pattern.items():
            module = key[: -len(".lora_E")]
            for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                file_key = f"base_model.model.{module}.{attr}"
                if file_key in out and out[file_key].shape[dim] == len(keep):
                    out[file_key] = out[file_key].index_select(dim, kept_index(keep, out[file_key]))
        return out

    def before_loading(self, adapter_name: str) -> None:
        """Shrink layers to a saved rank_pattern so the pruned file tensors fit."""
        pattern = self.peft_config[adapter_name].rank_pattern
        for path, layer in self._svd_layers(adapter_name).items():
            keep = (pattern or {}).get(f"{path}.lora_E")
            if keep is not None and layer.lora_E[adapter_name].shape[0] == len(keep):
                layer.keep_ranks(adapter_name, keep)

    def training_state(self) -> dict[str, Any]:
        """What an exact resume needs beyond the saved adapter: the allocator's importance EMAs, the current
        allocation, and the *unpruned* A/E/B (masked ranks keep training and can win their rank back)."""
        alloc = self.rankallocator
        name = alloc.adapter
        return {
            "adapter": name,
            "rank_pattern": self.peft_config[name].rank_pattern,
            "tensors": {
                f"{path}.{attr}": getattr(layer, attr)[name].detach().clone()
                for path, layer in alloc.layers.items()
                for attr in ("lora_A", "lora_E", "lora_B")
            },
            "allocator": alloc.state(),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Inverse of `training_state`, on a model loaded from that checkpoint; call before building the
        optimizer (the layers get their full-rank parameters back, as new tensors)."""
        name = state["adapter"]
        layers = self._svd_layers(name)
        saved = {key.rpartition(".")[0] for key in state["tensors"]}
        if saved != set(layers):
            raise ValueError(
                f"AdaLoRA training state of adapter {name!r} does not fit this model: modules only in the "
                f"state {sorted(saved - set(layers))}, only in the model {sorted(set(layers) - saved)}"
            )
        for path, layer in layers.items():
            layer.set_full_ranks(
                name, {attr: state["tensors"][f"{path}.{attr}"] for attr in ("lora_A", "lora_E", "lora_B")}
            )
        self.peft_config[name] = dataclasses.replace(
            self.peft_config[name], rank_pattern=state["rank_pattern"]
        )
        self.rankallocator = RankAllocator(self.peft_config[name], layers, name)
        self.rankallocator.load_state(state["allocator"])


register_peft_method(peft_type="ADALORA", config_cls=AdaLoraConfig, tuner_cls=AdaLoraModel, prefix="lora_")
