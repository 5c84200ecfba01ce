"""Adapter files: HF-peft-compatible tensor keys, safetensors, atomic writes, and safe loading.

The one key-renaming rule between memory and disk lives in `adapter_key_map`: an adapter's in-memory key
is its file key with the adapter-name component added after the container it lives in
(`...q_proj.lora_A.default.weight` <-> `...q_proj.lora_A.weight`; `...score.modules_to_save.default.weight`
<-> `...score.weight`). Loading inverts the same map, so both directions agree by construction.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save_bytes
from torch import nn

from .atomic_files import atomic_write_bytes, write_files_together
from .config import CONFIG_NAME
from .hub_files import resolve_adapter_file
from .modules_to_save import ModulesToSaveWrapper
from .tuners.base import AdapterLayer, BaseTuner
from .tuners.prompt_base import PROMPT_EMBEDDINGS_KEY

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_key_map(root: nn.Module, adapter_name: str) -> dict[str, str]:
    """{in-memory state-dict key: file key} for every tensor that belongs to `adapter_name` under `root`.

    Prompt-learning adapters are one file tensor, `prompt_embeddings` (the prompt encoder's rows; saving puts
    the computed rows there, see `PromptLearningTuner.tensors_for_saving`). HF peft's prompt-learning wrapper
    holds the transformers model directly, so the `model.` level of our tuner is dropped from other keys.
    """
    out: dict[str, str] = {}
    drop = (
        ""  # "<tuner path>.model." under a registered prompt-learning tuner: HF's file keys lack that level
    )
    for path, module in root.named_modules():
        prefix = f"{path}." if path else ""
        if getattr(type(module), "is_prompt_learning", False) and adapter_name in module.prompt_encoder:
            out[f"{prefix}prompt_encoder.{adapter_name}.embedding.weight"] = PROMPT_EMBEDDINGS_KEY
            drop = f"{prefix}model."
        elif getattr(module, "holds_prompt_encoders", False) and adapter_name in module:  # PeftModel's own
            out[f"{prefix}{adapter_name}.embedding.weight"] = PROMPT_EMBEDDINGS_KEY
        if isinstance(module, (AdapterLayer, BaseTuner)):
            for attr in _adapter_containers(module):
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                mem, disk = f"{prefix}{attr}.{adapter_name}", f"{prefix}{attr}"
                if isinstance(item, nn.Module):
                    flat = attr in getattr(module, "flat_file_attrs", ())  # DoRA's magnitude: no `.weight`
                    out.update({f"{mem}.{k}": disk if flat else f"{disk}.{k}" for k in item.state_dict()})
                else:
                    out[mem] = disk
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k in module.modules_to_save[adapter_name].state_dict():
                disk = f"{prefix}{k}"
                if drop and disk.startswith(drop):
                    disk = drop[: -len("model.")] + disk[len(drop) :]
                out[f"{prefix}modules_to_save.{adapter_name}.{k}"] = disk
    return out


def _adapter_containers(module: nn.Module) -> tuple[str, ...]:
    """Attributes of `module` holding tensors keyed by adapter name: an adapter layer's `adapter_attrs`, or a
    tuner's `shared_adapter_attrs` (tensors all its layers share, e.g. VeRA's projections `vera_A`/`vera_B`)."""
    if isinstance(module, AdapterLayer):
        return module.adapter_attrs
    return getattr(module, "shared_adapter_attrs", ())


def find_weights_file(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> str:
    """`adapter_model.safetensors`, or a legacy `adapter_model.bin`, in an adapter folder."""
    errors = []
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        try:
            path = resolve_adapter_file(model_id, name, subfolder, **hub_kwargs)
        except FileNotFoundError as err:
            errors.append(str(err))
            continue
        if os.path.isfile(path):
            return path
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    raise FileNotFoundError(
        f"No adapter weights in {folder}: expected {SAFETENSORS_WEIGHTS_NAME} (or legacy {WEIGHTS_NAME})"
        + (f" ({errors[0]})" if errors and not os.path.isdir(folder) else "")
    )


def load_weights_file(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read adapter tensors. safetensors always; a legacy `.bin` only with `weights_only=True` (no pickle code)."""
    if path.endswith(".safetensors"):
        size = check_safetensors_header(path)
        try:
            tensors = st_load_file(path)
        except (SafetensorError, ValueError, RuntimeError, OSError) as err:
            raise ValueError(
                f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupt ({size} bytes)"
            ) from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: cannot be read as a weights-only torch file ({err})") from None
        if not isinstance(tensors, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(tensors).__name__}")
    return {k: v.to(device) for k, v in tensors.items()}


# bytes per element of each safetensors dtype torch can hold
_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "C64": 8,
}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def check_safetensors_header(path: str) -> int:
    """Validate a safetensors file's header against the file's size before any tensor is read; return the size.

    The header is `<u64 length><JSON>`: every entry needs a known dtype, a shape of non-negative ints and
    `data_offsets` inside the file whose span is exactly `prod(shape) * itemsize`. A header that claims more
    data than the file holds (a truncated file, or one lying about terabytes) is refused here, so nothing is
    allocated from its numbers.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(
                f"{path}: not a safetensors file ({size} bytes; the 8-byte header length is missing)"
            )
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError(
                f"{path}: corrupt or truncated safetensors file: its header claims {length} bytes but the file has "
                f"{size - 8} after the length field"
            )
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: corrupt safetensors header (not UTF-8 JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_size = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        problem = _header_entry_problem(entry, data_size)
        if problem:
            raise ValueError(f"{path}: corrupt safetensors header: tensor {key!r} {problem}")
    return size


def _header_entry_problem(entry: Any, data_size: int) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return "has no {dtype, shape, data_offsets} entry"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_ITEMSIZE:
        return f"has dtype {dtype!r}; expected one of {', '.join(_ST_ITEMSIZE)}"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"has shape {shape!r}; expected a list of non-negative integers"
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not ok or not 0 <= offsets[0] <= offsets[1] <= data_size:
        return f"has data_offsets {offsets!r} outside the file's {data_size} data bytes (a truncated file?)"
    if offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEMSIZE[dtype]:
        return f"declares shape {shape} ({dtype}) but spans {offsets[1] - offsets[0]} bytes"
    return None


def tensors_to_bytes(tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> bytes:
    """Adapter tensors as the bytes of a safetensors file (or of a torch `.bin` when asked)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if safe_serialization:
        # shared storage (tied tensors) is not allowed by safetensors; adapters rarely share, so clone
        tensors = {k: v.clone() for k, v in tensors.items()}
        return st_save_bytes(tensors, metadata={"format": "pt"})
    import io as _io

    buf = _io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def save_tensors(path: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> None:
    """Write adapter tensors atomically (safetensors, or a torch `.bin` when asked)."""
    atomic_write_bytes(path, tensors_to_bytes(tensors, safe_serialization))


def save_adapter_files(folder: str, config_json: bytes, tensors: bytes, weights_name: str) -> None:
    """Write an adapter's config and weights as one unit: a reader sees the old pair or the new pair, never
    a mix (`atomic_files.write_files_together`); other files in `folder` are left alone."""
    write_files_together(folder, {weights_name: tensors, CONFIG_NAME: config_json})


def write_json(path: str, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
