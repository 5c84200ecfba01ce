"""`add_weighted_adapter`: a new adapter made from a weighted combination of existing ones.

LoRA adapters combine by one of three routes (the math is in `functional/combine.py`):

- `"cat"`: the factors are stacked, A_new = [w_1 s_1 A_1; ...; w_k s_k A_k], B_new = [B_1 ... B_k], so
  B_new @ A_new = sum_i w_i s_i B_i A_i exactly; the rank is the sum of the ranks.
- `"linear"`, `"ties"`, `"dare_linear"`, `"dare_ties"`, `"magnitude_prune"`: A and B are combined
  separately (A with weights sign(w_i) sqrt(|w_i s_i|), B with sqrt(|w_i s_i|)); needs equal ranks. An
  approximation: the product of the sums is not the sum of the products.
- `"svd"` and the `*_svd` variants: the dense updates s_i B_i A_i are combined by the scheme named before
  `_svd` (`svd` alone is the weighted sum), then factored back to rank `svd_rank` (default: the largest
  rank) by SVD.

The new adapter has `lora_alpha = r` (scaling 1: the combination carries the scalings), is not activated
(call `set_adapter`) and does not train. IA3 adapters combine as the weighted sum of their vectors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .functional import combine as C
from .modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from .peft_model import PeftModel
    from .tuners.base import AdapterLayer

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)


def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> None:
    """Add `adapter_name` to `model` as the combination of `adapters` weighted by `weights` (see the module
    docstring). DARE types draw their random masks from `generator` (default: the global torch RNG)."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_request(model, adapters, weights, adapter_name)
    peft_type = model.peft_config[adapters[0]].peft_type
    if peft_type == "IA3":
        _add_ia3(model, adapters, weights, adapter_name)
    elif peft_type == "LORA":
        kind = "linear" if len(adapters) == 1 else combination_type
        if kind not in COMBINATION_TYPES:
            raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
        if majority_sign_method not in C.SIGN_METHODS:
            raise ValueError(
                f"majority_sign_method must be one of {C.SIGN_METHODS}, got {majority_sign_method!r}"
            )
        rank = _new_rank(model, adapters, kind, svd_rank)
        _inject(model, adapters, adapter_name, r=rank, lora_alpha=rank, use_rslora=False)
        options = {
            "density": density,
            "majority_sign_method": majority_sign_method,
            "generator": generator,
            "svd": {"clamp": svd_clamp, "full_matrices": svd_full_matrices, "driver": svd_driver},
        }
        for _, layer in model.base_model.adapter_layers():
            if adapter_name in layer.adapter_names:
                _combine_lora_layer(layer, adapters, weights, adapter_name, kind, options)
    else:
        raise ValueError(
            f"add_weighted_adapter combines LoRA or IA3 adapters; {adapters[0]!r} is a {peft_type} adapter"
        )
    _carry_modules_to_save(model, adapters, adapter_name)


# ----- checks and the new adapter's config -------------------------------------------------------------------
def _check_request(model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    if not adapters:
        raise ValueError("add_weighted_adapter: adapters is empty; name at least one adapter to combine")
    if len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; give one weight each"
        )
    for name in adapters:
        model._check_adapter_name(name)
    if adapter_name in model.peft_config:
        raise ValueError(f"add_weighted_adapter: adapter {adapter_name!r} already exists; pick a new name")
    configs = {name: model.peft_config[name] for name in adapters}
    types = {c.peft_type for c in configs.values()}
    if len(types) > 1:
        raise ValueError(f"add_weighted_adapter: cannot combine adapters of different methods ({types})")
    for name, config in configs.items():
        unsupported = [
            opt
            for opt in ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices")
            if getattr(config, opt, None)
        ]
        if unsupported:
            raise ValueError(
                f"add_weighted_adapter: adapter {name!r} uses {', '.join(unsupported)}, which a weighted "
                "combination of A/B factors cannot represent; combine plain LoRA adapters"
            )
    for wrapper in model.get_base_model().modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            owners = [a for a in adapters if a in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"add_weighted_adapter: adapters {owners} each train their own copy of a module in "
                    "modules_to_save; full modules cannot be combined. Combine adapters with at most one of them"
                )


def _max_rank(config: Any) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _new_rank(model: PeftModel, adapters: list[str], kind: str, svd_rank: int | None) -> int:
    ranks = {a: _max_rank(model.peft_config[a]) for a in adapters}
    if kind == "cat":
        return sum(ranks.values())
    if kind in SVD_TYPES:
        return svd_rank or max(ranks.values())
    if len(set(ranks.values())) != 1:
        raise ValueError(
            f"combination_type {kind!r} combines the A and B factors entry by entry and needs equal ranks; "
            f"got {ranks}. Use 'cat' or an '*_svd' type for adapters of different ranks"
        )
    return next(iter(ranks.values()))


def _union(values: list[Any], field: str) -> Any:
    """The targets of every adapter together: regexes joined by `|`, name lists merged."""
    if all(v is None for v in values):
        return None
    kinds = {isinstance(v, str) for v in values}
    if len(kinds) > 1 or None in values:
        raise ValueError(
            f"add_weighted_adapter: {field} mixes a regex string with name lists ({values}); "
            "give every adapter the same kind"
        )
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return sorted(set().union(*values))


def _inject(model: PeftModel, adapters: list[str], adapter_name: str, **changes: Any) -> None:
    """Add `adapter_name` on every module any of `adapters` targets, with random (to be overwritten) tensors."""
    configs = [model.peft_config[a] for a in adapters]
    changes["target_modules"] = _union([c.target_modules for c in configs], "target_modules")
    if hasattr(configs[0], "rank_pattern"):
        changes.update(rank_pattern={}, alpha_pattern={}, init_lora_weights=True)
    if hasattr(configs[0], "feedforward_modules"):
        changes["feedforward_modules"] = _union(
            [c.feedforward_modules for c in configs], "feedforward_modules"
        )
    config = dataclasses.replace(configs[0], **changes)
    model.base_model.inject_adapter(config, adapter_name, init_weights=False)


# ----- LoRA ----------------------------------------------------------------------------------------------------
def _factors(layer: AdapterLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) parameters of `name` in `layer`: A (r, in[, kh, kw]), B (out, r[, 1, 1])."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _combine_lora_layer(
    layer: AdapterLayer,
    adapters: list[str],
    weights: list[float],
    new: str,
    kind: str,
    options: dict[str, Any],
) -> None:
    """Write the combination of `adapters` (those present in `layer`) into `new`'s A and B."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    A_new, B_new = _factors(layer, new)
    if not present:
        A, B = torch.zeros_like(A_new), torch.zeros_like(B_new)
    elif kind == "cat":
        A = torch.cat([_factors(layer, a)[0] * (w * layer.scaling[a]) for a, w in present], dim=0)
        B = torch.cat([_factors(layer, a)[1] for a, _ in present], dim=1)
        A = torch.cat([A, A.new_zeros((A_new.shape[0] - A.shape[0], *A.shape[1:]))], dim=0)
        B = torch.cat([B, B.new_zeros((B.shape[0], B_new.shape[1] - B.shape[1], *B.shape[2:]))], dim=1)
    elif kind in SVD_TYPES:
        A, B = _svd_combination(layer, present, kind, A_new, B_new, options)
    else:
        A, B = _factor_combination(layer, present, kind, options)
    with torch.no_grad():
        A_new.copy_(A.detach().to(A_new.dtype))
        B_new.copy_(B.detach().to(B_new.dtype))


def _factor_combination(
    layer: AdapterLayer, present: list[tuple[str, float]], kind: str, options: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {a: tuple(_factors(layer, a)[0].shape) for a, _ in present}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"combination_type {kind!r}: adapters have different ranks on {layer.module_name} ({shapes}); "
            "use 'cat' or an '*_svd' type"
        )
    scaled = [w * layer.scaling[a] for a, w in present]
    w_A = [math.copysign(math.sqrt(abs(s)), s) for s in scaled]
    w_B = [math.sqrt(abs(s)) for s in scaled]
    args = (options["density"], options["majority_sign_method"], options["generator"])
    A = C.combine(kind, [_factors(layer, a)[0].detach() for a, _ in present], w_A, *args)
    B = C.combine(kind, [_factors(layer, a)[1].detach() for a, _ in present], w_B, *args)
    return A, B


def _svd_combination(
    layer: AdapterLayer,
    present: list[tuple[str, float]],
    kind: str,
    A_new: torch.Tensor,
    B_new: torch.Tensor,
    options: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    scheme = "linear" if kind == "svd" else kind.removesuffix("_svd")
    with torch.no_grad():
        deltas = [layer._delta_rows(a).float() for a, _ in present]  # (out, in[, kh, kw]) each
    delta = C.combine(
        scheme,
        deltas,
        [w for _, w in present],
        options["density"],
        options["majority_sign_method"],
        options["generator"],
    )
    B, A = C.low_rank(delta.flatten(1), A_new.shape[0], **options["svd"])
    return A.reshape(A_new.shape), B.reshape(B_new.shape)


# ----- IA3 and modules_to_save -----------------------------------------------------------------------------------
def _add_ia3(model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    _inject(model, adapters, adapter_name)
    for _, layer in model.base_model.adapter_layers():
        if adapter_name not in layer.ia3_l:
            continue
        present = [(layer.ia3_l[a].detach(), w) for a, w in zip(adapters, weights) if a in layer.ia3_l]
        with torch.no_grad():
            layer.ia3_l[adapter_name].zero_()
            for vector, w in present:
                layer.ia3_l[adapter_name].add_(vector * w)


def _carry_modules_to_save(model: PeftModel, adapters: list[str], adapter_name: str) -> None:
    """The new adapter uses the trained copy of a full module (a head) of the one adapter that has it; then the
    active adapter is set again, so the new one stays inactive and frozen."""
    for wrapper in model.get_base_model().modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        owner = next((a for a in adapters if a in wrapper.modules_to_save), None)
        if owner is not None and adapter_name not in wrapper.modules_to_save:
            wrapper.update(adapter_name)
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owner].state_dict())
    model.set_adapter(model.active_adapter)
