"""Adapter files: HF-peft-compatible tensor keys, safetensors, atomic writes, and safe loading.

The one key-renaming rule between memory and disk lives in `adapter_key_map`: an adapter's in-memory key
is its file key with the adapter-name component added after the container it lives in
(`...q_proj.lora_A.default.weight` <-> `...q_proj.lora_A.weight`; `...score.modules_to_save.default.weight`
<-> `...score.weight`). Loading inverts the same map, so both directions agree by construction.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes
from torch import nn

from .atomic_files import atomic_write_bytes, finish_pending_writes, write_files_together
from .modules_to_save import ModulesToSaveWrapper
from .tuners.base import AdapterLayer, BaseTuner

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"  # the one tensor of a prompt-learning adapter file


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


def resolve_adapter_file(
    model_id: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str:
    """Path of `filename` in a local adapter folder, or downloaded from the Hub for a repo id."""
    model_id = os.fspath(model_id)
    local_dir = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local_dir):
        finish_pending_writes(local_dir)  # a save interrupted after its commit point: see the new pair
        return os.path.join(local_dir, filename)
    if os.path.exists(model_id) or model_id.startswith((".", "/")) or model_id.count("/") > 1:
        raise FileNotFoundError(f"Adapter folder {local_dir} does not exist")
    try:
        from huggingface_hub import hf_hub_download

        keep = {
            k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "force_download")
        }
        return hf_hub_download(model_id, filename, subfolder=subfolder, **keep)
    except Exception as err:  # offline, missing repo, missing file: one clear message
        raise FileNotFoundError(
            f"{model_id!r} is not a local folder and could not be fetched from the Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


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
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            tensors = st_load_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupt "
                f"({len(data)} bytes)"
            ) from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: cannot be read as a weights-only torch file ({err})") from None
        if not isinstance(tensors, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(tensors).__name__}")
    return {k: v.to(device) for k, v in tensors.items()}


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
    from .config import CONFIG_NAME

    write_files_together(folder, {weights_name: tensors, CONFIG_NAME: config_json})


def write_json(path: str, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
