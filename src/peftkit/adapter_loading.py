"""Copy an adapter file's tensors into an injected adapter, with errors that name what does not fit."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from . import io
from .inference_fold import drop_folds
from .mixed_batch import drop_stacks


class LoadResult(NamedTuple):
    """Keys the file lacked (in memory) and keys it had that fit nowhere (file names)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _module_of(memory_key: str, adapter_name: str) -> str:
    """`...q_proj.lora_A.default.weight` -> `...q_proj` (the module users know)."""
    head = memory_key.split(f".{adapter_name}", 1)[0]
    return head.rsplit(".", 1)[0] if "." in head else head


def copy_adapter_tensors(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    adapter_name: str,
    source: str,
    key_map: dict[str, str] | None = None,
) -> LoadResult:
    """Load file tensors (HF peft keys) into `adapter_name` of `model`; `key_map` ({in-memory key: file key})
    defaults to `io.adapter_key_map` (a mixed model passes its own, see `tuners/mixed.py`).

    Raises:
        ValueError: a tensor's shape differs from the module's; the message names the file, the module,
            and both shapes (e.g. an adapter trained for another model size).
    """
    key_map = io.adapter_key_map(model, adapter_name) if key_map is None else key_map
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
            if target.is_floating_point() and not value.is_floating_point():
                raise ValueError(
                    f"{source}: tensor {disk_key!r} has dtype {value.dtype} but module "
                    f"{_module_of(mem_key, adapter_name)!r} holds floating-point weights"
                )
            if target.shape != value.shape:
                raise ValueError(
                    f"{source}: tensor {disk_key!r} has shape {tuple(value.shape)} but module "
                    f"{_module_of(mem_key, adapter_name)!r} expects {tuple(target.shape)} "
                    "(was this adapter trained on a different base model or with another r?)"
                )
            target.data.copy_(value.to(target.dtype))
            loaded.add(mem_key)
    # `.data` writes do not bump `_version`: forget folded LoRA weights and mixed-batch stacks built from them
    drop_folds(model)
    drop_stacks(model)
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


# methods whose file holds `r` as a tensor dimension (LoRA's lora_A [r, in], LoHa's hada_w1_a [out, r], VeRA's
# vera_lambda_d [r]); LoKr may store full matrices smaller than r, and OFT's r counts blocks
_RANK_IN_FILE = ("LORA", "LOHA", "VERA")


def check_rank_fits_file(config: Any, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a LoRA/LoHa/VeRA config whose rank no tensor of its weights file has, before any adapter is built.

    A LoRA file holds every rank as a dimension (`lora_A` is `[r, in]`), so an `r` (or a `rank_pattern` value)
    larger than every dimension in the file is a config that lies about its file: building it first would
    allocate `r x in` per layer (gigabytes for a corrupted `r`) only to fail the shape check afterwards.
    """
    if getattr(config, "peft_type", None) not in _RANK_IN_FILE or not tensors:
        return
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=1)
    ranks = {
        "r": config.r,
        **{f"rank_pattern[{k!r}]": v for k, v in (getattr(config, "rank_pattern", None) or {}).items()},
    }
    for name, rank in ranks.items():
        if isinstance(rank, int) and rank > largest:
            raise ValueError(
                f"{source}: {name}={rank} but no tensor in the adapter's weights file has a dimension that "
                f"large (largest: {largest}); the config does not describe this file"
            )


@contextlib.contextmanager
def errors_name(source: str) -> Iterator[None]:
    """Errors raised while building an adapter from a loaded config name the config's file.

    A `ValueError` keeps its type (e.g. `NoMatchingPeftModuleError`); what torch raises for sizes it cannot
    create (an overflowing or unallocatable shape from a huge config value) becomes one `ValueError`.
    """
    try:
        yield
    except ValueError as err:
        if source in str(err):
            raise
        try:
            new = type(err)(f"{source}: {err}")
        except Exception:  # an exception type with another signature
            new = ValueError(f"{source}: {err}")
        raise new from err
    except (TypeError, RuntimeError, OverflowError, MemoryError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{source}: the adapter this config describes cannot be built on this model "
            f"({type(err).__name__}: {first}); check its sizes (e.g. r) and target modules"
        ) from err
