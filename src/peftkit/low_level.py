"""HF peft's low-level API: adapters injected into any `nn.Module` in place (no wrapper), adapter and base
state dicts, and reading adapter weights.

`inject_adapter_in_model` leaves a plain model with adapter layers inside; the state-dict functions work on
that and on a `PeftModel` alike, with HF peft's file keys (`io.adapter_key_map`), so a state dict from one
library loads into the other.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Literal

import torch
from torch import nn

from . import io
from .adapter_loading import LoadResult, copy_adapter_tensors
from .config import PeftConfig
from .modules_to_save import ModulesToSaveWrapper
from .registry import get_method
from .tuners.base import AdapterLayer
from .tuners.switching import adapter_modules, tuner_of

PEFT_MODEL_PREFIX = "base_model.model."  # what a PeftModel's file keys start with (non prompt-learning)


# ----- injection ----------------------------------------------------------------------------------------------
def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add the adapter `peft_config` describes to `model` in place and return `model` (no wrapper).

    Only the adapter tensors (and `modules_to_save` copies) require grad afterwards. With `state_dict`, the
    targets are the modules that state dict has adapter tensors for (its keys with or without the
    `base_model.model.` prefix), whatever `target_modules` says: for checkpoints saved without a config.
    `low_cpu_mem_usage` is accepted for compatibility; peftkit creates adapter tensors on the base layer's
    device directly.

    Raises:
        ValueError: a prompt-learning config (those need the `PeftModel` wrapper), or no target found
            (`NoMatchingPeftModuleError`, naming the modules the model has).
    """
    method = get_method(peft_config.peft_type)
    if method.is_prompt_learning or method.tuner_cls is None:
        raise ValueError(
            f"inject_adapter_in_model: {method.peft_type} is a prompt-learning method, which adds virtual "
            "tokens in the wrapper's forward; use get_peft_model(model, config) instead"
        )
    if state_dict is not None:
        peft_config = dataclasses.replace(
            peft_config, target_modules=_targets_in_state_dict(model, state_dict, method.prefix)
        )
    tuner = method.tuner_cls(model, peft_config, adapter_name)
    _wrap_modules_to_save(model, tuner.peft_config[adapter_name], adapter_name)
    _activate_like_reference(model, adapter_name, trainable=not peft_config.inference_mode)
    return model


def _activate_like_reference(model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """As HF peft leaves a model after injection: the new adapter is the active one in every adapter layer
    (layers without it compute nothing for it), and every adapter's tensors require grad, earlier ones too
    (the model has no wrapper to switch adapters with, so nothing is frozen on the user's behalf)."""
    for _, layer in adapter_modules(model):
        layer.active_adapters = [adapter_name]
        layer.set_requires_grad(layer.adapter_names, trainable)


def _targets_in_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> str:
    """A regex matching exactly the modules of `model` that `state_dict` holds adapter tensors for."""
    keys = [k.removeprefix(PEFT_MODEL_PREFIX) for k in state_dict]
    names = sorted(
        name
        for name, _ in model.named_modules()
        if name and any(k.startswith(f"{name}.{prefix}") for k in keys)
    )
    if not names:
        raise ValueError(
            f"inject_adapter_in_model: state_dict has no keys like '<module>.{prefix}...' for a module of "
            f"{type(model).__name__} (first keys: {list(state_dict)[:3]})"
        )
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def _wrap_modules_to_save(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Give `adapter_name` a trainable copy of each module named in `config.modules_to_save`."""
    names = getattr(config, "modules_to_save", None) or []
    for key, module in list(model.named_modules()):
        if ".modules_to_save." in f".{key}." or ".original_module." in f".{key}.":
            continue
        if not any(key == n or key.endswith("." + n) for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
            module.set_adapter(module.active_adapter)
        else:
            parent_key, _, child = key.rpartition(".")
            parent = model.get_submodule(parent_key) if parent_key else model
            setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))


# ----- adapter state dicts --------------------------------------------------------------------------------------
def _is_peft_model(model: nn.Module) -> bool:
    return tuner_of(model) is not None and hasattr(model, "_load_adapter_tensors")


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under the file keys HF peft writes (adapter name removed).

    model: a PeftModel (keys start `base_model.model.`) or a model with adapters injected in place (keys
    are its own module names). state_dict: take the tensors from here instead of `model.state_dict()`.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if _is_peft_model(model):
        return model.get_adapter_state_dict(adapter_name, state_dict, save_embedding_layers)
    source = model.state_dict() if state_dict is None else state_dict
    keys = io.adapter_key_map(model, adapter_name)
    if not keys:
        raise ValueError(f"get_peft_model_state_dict: {type(model).__name__} has no adapter {adapter_name!r}")
    return {disk: source[mem] for mem, disk in keys.items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Copy adapter tensors (file keys, or in-memory keys) into `adapter_name` of `model`.

    Returns (missing_keys, unexpected_keys) as `nn.Module.load_state_dict` does: every state-dict key of
    `model` not loaded (base weights included), and the given keys that fit no tensor. A shape mismatch
    raises, naming the module and both shapes; with `ignore_mismatched_sizes` such tensors are skipped
    with a warning instead. `low_cpu_mem_usage` is accepted for compatibility (tensors are copied in place).
    """
    tensors = dict(peft_model_state_dict)
    if ignore_mismatched_sizes:
        tensors = _drop_mismatched(model, tensors, adapter_name)
    source = "set_peft_model_state_dict"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"{source}: ")  # reported through the return value
        if _is_peft_model(model):
            result = model._load_adapter_tensors(tensors, adapter_name, source)
        else:
            result = copy_adapter_tensors(model, tensors, adapter_name, source)
    keys = io.adapter_key_map(model, adapter_name)
    loaded = set(keys) - set(result.missing_keys)
    missing = [k for k in model.state_dict() if k not in loaded]
    return LoadResult(missing, result.unexpected_keys)


def _drop_mismatched(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str
) -> dict[str, torch.Tensor]:
    inverse = {disk: mem for mem, disk in io.adapter_key_map(model, adapter_name).items()}
    own = model.state_dict()
    kept = {}
    for key, value in tensors.items():
        target = own.get(inverse.get(key, key))
        if target is not None and target.shape != value.shape:
            warnings.warn(
                f"set_peft_model_state_dict: skipping {key!r}: shape {tuple(value.shape)} in the state dict, "
                f"{tuple(target.shape)} in the model (ignore_mismatched_sizes=True)",
                stacklevel=3,
            )
            continue
        kept[key] = value
    return kept


def load_peft_weights(
    model_id: str,
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (or Hub repo), under their file keys.

    device: where to put them (default: "cuda" when available, else "cpu"). key_mapping: {regex:
    replacement}; each key (without its `base_model.model.` prefix) is rewritten by the first pattern that
    matches it, e.g. to rename modules of a checkpoint made for an older model layout.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    path = io.find_weights_file(model_id, subfolder, **hf_hub_download_kwargs)
    tensors = io.load_weights_file(path, device=device)
    if key_mapping:
        tensors = {_remap(key, key_mapping): value for key, value in tensors.items()}
    return tensors


def _remap(key: str, key_mapping: dict[str, str]) -> str:
    head = PEFT_MODEL_PREFIX if key.startswith(PEFT_MODEL_PREFIX) else ""
    body = key[len(head) :]
    for pattern, replacement in key_mapping.items():
        body, count = re.subn(pattern, replacement, body)
        if count:
            break
    return head + body


# ----- base-model state dicts -------------------------------------------------------------------------------------
def _base_module(model: nn.Module) -> nn.Module:
    tuner = tuner_of(model)
    return tuner.model if tuner is not None else model


def _base_key_map(model: nn.Module) -> dict[str, str]:
    """{in-memory key of `model`'s base module: the key it has in the model without adapters}."""
    renames: list[tuple[str, str]] = []  # (in-memory prefix, base prefix)
    dropped: list[str] = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, AdapterLayer):
            renames.append((f"{prefix}base_layer.", prefix))
            dropped += [f"{prefix}{attr}." for attr in module.adapter_attrs]
        elif isinstance(module, ModulesToSaveWrapper):
            renames.append((f"{prefix}original_module.", prefix))
            dropped.append(f"{prefix}modules_to_save.")
    out = {}
    for key in model.state_dict():
        if any(key.startswith(d) for d in dropped):
            continue
        base = key
        for mem, plain in renames:
            if base.startswith(mem):
                base = plain + base[len(mem) :]
        out[key] = base
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under the keys it had before adapters were added (`...q_proj.weight`, not
    `...q_proj.base_layer.weight`; adapter tensors and trained module copies left out).

    model: a PeftModel (keys relative to the wrapped model) or a model with adapters injected in place.
    """
    base = _base_module(model)
    source = base.state_dict()
    return {plain: source[mem] for mem, plain in _base_key_map(base).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> LoadResult:
    """Load base-model tensors (keys as in the model without adapters) into `model`; the adapters are kept.

    Raises:
        RuntimeError: with `strict`, when keys are missing or unexpected (both listed), as `load_state_dict`.
    """
    base = _base_module(model)
    inverse = {plain: mem for mem, plain in _base_key_map(base).items()}
    renamed = {inverse.get(k, k): v for k, v in state_dict.items()}
    result = base.load_state_dict(renamed, strict=False)
    missing = [inverse_key for mem, inverse_key in _base_key_map(base).items() if mem in result.missing_keys]
    unexpected = [k for k in state_dict if inverse.get(k, k) in result.unexpected_keys]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"set_base_model_state_dict({type(base).__name__}): missing keys {missing}; unexpected keys {unexpected}"
        )
    return LoadResult(missing, unexpected)
