"""Copy an adapter file's tensors into an injected adapter, with errors that name what does not fit."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from . import io
from .inference_fold import drop_folds


class LoadResult(NamedTuple):
    """Keys the file lacked (in memory) and keys it had that fit nowhere (file names)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _module_of(memory_key: str, adapter_name: str) -> str:
    """`...q_proj.lora_A.default.weight` -> `...q_proj` (the module users know)."""
    head = memory_key.split(f".{adapter_name}", 1)[0]
    return head.rsplit(".", 1)[0] if "." in head else head


def copy_adapter_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str, source: str
) -> LoadResult:
    """Load file tensors (HF peft keys) into `adapter_name` of `model`.

    Raises:
        ValueError: a tensor's shape differs from the module's; the message names the file, the module,
            and both shapes (e.g. an adapter trained for another model size).
    """
    key_map = io.adapter_key_map(model, adapter_name)
    inverse = {disk: mem for mem, disk in key_map.items()}
    own = model.state_dict(keep_vars=True)
    loaded, unexpected = set(), []
    with torch.no_grad():
        for disk_key, value in tensors.items():
            mem_key = inverse.get(disk_key, disk_key if disk_key in own else None)
            if mem_key is None:
                unexpected.append(disk_key)
                continue
            target = own[mem_key]
            if target.shape != value.shape:
                raise ValueError(
                    f"{source}: tensor {disk_key!r} has shape {tuple(value.shape)} but module "
                    f"{_module_of(mem_key, adapter_name)!r} expects {tuple(target.shape)} "
                    "(was this adapter trained on a different base model or with another r?)"
                )
            target.data.copy_(value.to(target.dtype))
            loaded.add(mem_key)
    drop_folds(
        model
    )  # `.data` writes do not bump `_version`: forget folded LoRA weights (see inference_fold)
    missing = [k for k in key_map if k not in loaded]
    if missing:
        warnings.warn(
            f"{source}: adapter {adapter_name!r} has no tensors for {len(missing)} keys, e.g. "
            f"{missing[:3]}; they keep their initial values",
            stacklevel=3,
        )
    if unexpected:
        warnings.warn(
            f"{source}: {len(unexpected)} tensors match no module of this model, e.g. {unexpected[:3]}",
            stacklevel=3,
        )
    return LoadResult(missing, unexpected)
