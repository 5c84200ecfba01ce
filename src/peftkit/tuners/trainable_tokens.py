"""Trainable tokens: train only the embedding rows of given token ids (the usual way to teach a model new chat
special tokens), as a method of its own (`TrainableTokensConfig`) or beside LoRA (`trainable_token_indices`).

Each adapter holds `trainable_tokens_delta` (k, dim): the new rows themselves, initialised to the current ones.
When the output head shares the embedding's weight (tied embeddings), the head is wrapped too and reads the same
rows, as HF peft does. Math in `functional/trainable_tokens.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..functional import trainable_tokens as FT
from ..registry import register_peft_method
from .base import AdapterLayer, BaseTuner


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Configuration of trainable tokens (field names and defaults as in HF peft's `TrainableTokensConfig`).

    Attributes:
        token_indices: ids of the tokens whose embedding rows train (non-empty, each in [0, vocab)).
        target_modules: the embedding layer(s): a name or regex; None for the model's input embedding.
        init_weights: True starts from the current rows (a no-op until trained); False from random N(0, 1) rows.
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "TRAINABLE_TOKENS"
        check_token_indices(self.token_indices, "TrainableTokensConfig: token_indices")


def check_token_indices(indices: Any, what: str) -> None:
    """Raise unless `indices` is a non-empty list of distinct non-negative ints."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ValueError(f"{what} must be a non-empty list of token ids, got {indices!r}")
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad:
        raise ValueError(f"{what} must hold non-negative integer token ids; bad entries: {bad}")
    if len(set(indices)) != len(indices):
        raise ValueError(
            f"{what} lists a token id twice: {sorted(i for i in set(indices) if indices.count(i) > 1)}"
        )


class TrainableTokensLayer(AdapterLayer):
    """An `nn.Embedding` (or the `nn.Linear` head tied to it) with new rows for some token ids per adapter.

    A head layer built with `tied_to` shares the embedding layer's `trainable_tokens_delta` and indices; it merges
    nothing itself (the weight is the same tensor, merged once through the embedding layer).
    """

    adapter_attrs = ("trainable_tokens_delta",)

    def __init__(
        self, base_layer: nn.Module, module_name: str = "", tied_to: TrainableTokensLayer | None = None
    ) -> None:
        super().__init__(base_layer, module_name)
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ValueError(
                f"Trainable tokens target an nn.Embedding (or its tied nn.Linear head); {module_name!r} is a "
                f"{type(base_layer).__name__}"
            )
        self.tied_to = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices

    def update_layer(self, adapter_name: str, config: Any, init_weights: bool = True) -> None:
        """config: a TrainableTokensConfig, or anything with `token_indices` and `init_weights`."""
        if self.tied_to:  # follows the embedding layer it is tied to
            self.set_adapter(self.active_adapters or [adapter_name])
            return
        indices, weight = list(config.token_indices), self.base_layer.weight
        if max(indices) >= weight.shape[0]:
            raise ValueError(
                f"token_indices {[i for i in indices if i >= weight.shape[0]]} are out of range for "
                f"{self.module_name or 'the embedding'} with {weight.shape[0]} rows"
            )
        if self.merged:
            self.unmerge()
        if init_weights and getattr(config, "init_weights", True):
            rows = weight.detach()[indices].clone()
        else:
            rows = torch.randn(len(indices), weight.shape[1], dtype=weight.dtype, device=weight.device)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows)
        self.set_adapter(self.active_adapters or [adapter_name])

    @property
    def adapter_names(self) -> list[str]:
        return list(self.trainable_tokens_delta.keys())

    def _index(self, adapter_name: str) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter_name], device=self.base_layer.weight.device)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, Any]:
        """Write the rows into the table; the state is the rows replaced (so unmerging restores them)."""
        if self.tied_to:
            return weight, None
        idx = self._index(adapter_name)
        return FT.replace_rows(weight, idx, self.trainable_tokens_delta[adapter_name]), weight[idx].clone()

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str, state: Any) -> torch.Tensor:
        if self.tied_to:
            return weight
        return FT.replace_rows(weight, self._index(adapter_name), state)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense difference (vocab, dim) that merging adds (for merge utilities)."""
        w = self.base_layer.weight
        return self.merge_weight(w.detach().clone(), adapter_name)[0] - w.detach()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Embedding: ids (...) -> (..., dim). Tied head: x (..., dim) -> (..., vocab)."""
        result = self.base_layer(x, *args, **kwargs)
        names = self._active_unmerged()
        seen: set[int] = set()
        for name in names:
            overlap = seen.intersection(self.token_indices[name])
            if overlap:
                raise ValueError(
                    f"Active adapters {names} of {self.module_name} both replace token ids {sorted(overlap)}; "
                    "activate adapters with disjoint token_indices"
                )
            seen.update(self.token_indices[name])
            idx, delta = self._index(name), self.trainable_tokens_delta[name]
            base = self.base_layer
            if isinstance(base, nn.Embedding):
                scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in forward
                rows = delta if scale is None else delta * torch.as_tensor(scale).to(delta)
                result = FT.embed_replaced(x, result, idx, rows, base.num_embeddings)
            else:
                result = FT.head_replaced(x, result, idx, delta, base.bias)
        return result


class TokenAdapterWrapper(nn.Module):
    """Holds a `TrainableTokensLayer` as `token_adapter` beside another method (LoRA's
    `trainable_token_indices`), so the keys read `<embedding>.token_adapter.trainable_tokens_delta.<adapter>` as in
    HF peft. Attribute reads the wrapper lacks (`weight`, `num_embeddings`, ...) go to the embedding."""

    def __init__(self, token_adapter: TrainableTokensLayer) -> None:
        super().__init__()
        self.token_adapter = token_adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter":
                raise
            return getattr(self.token_adapter.base_layer, name)


def add_token_adapters(
    model: nn.Module,
    targets: dict[str, list[int]],
    adapter_name: str,
    init_weights: bool,
    wrapped: bool,
    config: Any = None,
) -> None:
    """Give `model`'s embeddings named in `targets` ({full module name: token ids}) trainable rows for
    `adapter_name`, plus the output head when it shares a target's weight.

    wrapped: put each layer inside a `TokenAdapterWrapper` (beside LoRA) rather than in the module's place.
    config: passed to `update_layer` (its `init_weights` applies); else the token ids alone.
    """
    head_getter = getattr(model, "get_output_embeddings", None)
    head = head_getter() if callable(head_getter) else None
    for key, indices in targets.items():
        check_token_indices(indices, f"token ids for {key!r}")
        layer = _add_one(model, key, None, adapter_name, indices, init_weights, wrapped, config)
        embed_weight = layer.base_layer.weight
        head_key = _find_head(model, head, embed_weight)
        if head_key is not None:
            _add_one(model, head_key, layer, adapter_name, indices, init_weights, wrapped, config)


def _find_head(model: nn.Module, head: nn.Module | None, embed_weight: torch.Tensor) -> str | None:
    """Full name of the output head when it shares `embed_weight` (tied embeddings), else None."""
    if head is None:
        return None
    inner = head.token_adapter if isinstance(head, TokenAdapterWrapper) else head
    base = inner.base_layer if isinstance(inner, TrainableTokensLayer) else inner
    if getattr(base, "weight", None) is not embed_weight:
        return None
    return next(name for name, m in model.named_modules() if m is head)


def _add_one(
    model: nn.Module,
    key: str,
    tied_to: TrainableTokensLayer | None,
    adapter_name: str,
    indices: list[int],
    init_weights: bool,
    wrapped: bool,
    config: Any,
) -> TrainableTokensLayer:
    parent_key, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    module = getattr(parent, child)
    inner = module.token_adapter if isinstance(module, TokenAdapterWrapper) else module
    if isinstance(inner, TrainableTokensLayer):
        layer = inner
    else:
        layer = TrainableTokensLayer(inner, key, tied_to=tied_to)
        if tied_to is not None and wrapped:  # beside LoRA, HF peft's files hold the embedding's rows only
            layer.adapter_attrs = ()
        setattr(parent, child, TokenAdapterWrapper(layer) if wrapped else layer)
    spec = config if config is not None else _Tokens(indices, init_weights)
    if config is not None and list(config.token_indices) != indices:
        spec = _Tokens(indices, getattr(config, "init_weights", True))
    layer.update_layer(adapter_name, spec, init_weights)
    return layer


@dataclass
class _Tokens:
    token_indices: list[int]
    init_weights: bool = True


def unwrap_token_adapters(model: nn.Module) -> None:
    """Replace every `TokenAdapterWrapper` by what it holds (after unloading, the plain embedding)."""
    for key, module in list(model.named_modules()):
        if isinstance(module, TokenAdapterWrapper):
            parent_key, _, child = key.rpartition(".")
            parent = model.get_submodule(parent_key) if parent_key else model
            setattr(parent, child, module.token_adapter)


class TrainableTokensModel(BaseTuner):
    """Injects trainable-token layers (HF peft's `TrainableTokensModel`)."""

    prefix = "trainable_tokens_"

    def resolve_config(self, config: TrainableTokensConfig) -> TrainableTokensConfig:
        if config.target_modules is not None:
            return config
        embed = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        name = next((n for n, m in self.model.named_modules() if m is embed and n), "embed_tokens")
        return dataclasses.replace(config, target_modules=name)

    def inject_adapter(self, config: PeftConfig, adapter_name: str, init_weights: bool = True) -> None:
        from ..inject import find_targets
        from .base import _targets_as_set

        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete it first")
        config = _targets_as_set(self.resolve_config(config))
        keys = find_targets(self.model, config, wrapper_types=(AdapterLayer,))
        for p in self.model.parameters():
            p.requires_grad_(False)
        targets = {k: list(config.token_indices) for k in keys}
        add_token_adapters(self.model, targets, adapter_name, init_weights, wrapped=False, config=config)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)


register_peft_method(
    peft_type="TRAINABLE_TOKENS",
    config_cls=TrainableTokensConfig,
    tuner_cls=TrainableTokensModel,
    prefix="trainable_tokens_",
)
