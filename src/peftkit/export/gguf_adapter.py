"""A LoRA adapter folder as a llama.cpp LoRA adapter file (GGUF), written with the `gguf` package.

The file: `general.architecture` (llama.cpp's name for the base's architecture), `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and for every adapted weight `<gguf name>.lora_a` (r, in) and
`<gguf name>.lora_b` (out, r) in numpy order, e.g. `blk.0.attn_q.weight.lora_a` (llama.cpp's tensor names,
from `gguf.get_tensor_name_map`, the map its own converter uses).

llama.cpp scales every module by `alpha / r` with one file-wide alpha; peftkit writes the adapter's
`lora_alpha` and folds each module's own scaling (rsLoRA, `rank_pattern`, `alpha_pattern`) into `lora_b`,
so `lora_b @ lora_a * alpha / r` is the update peftkit applies. Where llama.cpp's converter reorders a weight's
rows (the query/key projections of Llama-family models, for its rotary layout), `lora_b`'s rows are reordered
the same way. Embedding adapters are written as llama.cpp reads them: a (r, dim) = B^T, b (vocab, r) = A^T.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import io
from ..config import PeftConfig

# HF `model_type` -> llama.cpp architecture (gguf.MODEL_ARCH member name); Mistral is "llama" in llama.cpp.
ARCHITECTURES = {
    "llama": "LLAMA",
    "mistral": "LLAMA",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "gemma": "GEMMA",
    "gemma2": "GEMMA2",
    "phi3": "PHI3",
    "gpt2": "GPT2",
}
_ROTARY_PERMUTED = {"LLAMA"}  # llama.cpp's converter permutes q/k rows for these
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices")


class ExportError(ValueError):
    """What cannot be expressed as a llama.cpp LoRA adapter, naming the module or option."""


def _permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for a (out, r) tensor whose rows are `n_head` heads of size out/n_head."""
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _check_config(config: PeftConfig, folder: Path) -> None:
    if config.peft_type != "LORA":
        raise ExportError(
            f"{folder}: a {config.peft_type} adapter; llama.cpp runs LoRA adapters only "
            "(merge it instead: peftkit export --format gguf --merged)"
        )
    used = [opt for opt in _UNSUPPORTED_OPTIONS if getattr(config, opt, None)]
    if used:
        raise ExportError(
            f"{folder}: the adapter uses {', '.join(used)}, which llama.cpp's LoRA format cannot express "
            "(merge it instead: peftkit export --format gguf --merged)"
        )


def _module_scaling(config: Any, module: str) -> tuple[float, int]:
    """(peftkit's scaling, rank) of one module, honouring rank/alpha patterns and rsLoRA."""
    r, alpha = config.rank_for(module), config.alpha_for(module)
    return (alpha / math.sqrt(r) if config.use_rslora else alpha / r), r


def adapter_tensors(folder: str | os.PathLike, base_config: Any) -> tuple[str, float, dict[str, np.ndarray]]:
    """(llama.cpp architecture name, file alpha, {gguf tensor name: array}) for the adapter in `folder`."""
    import gguf

    folder = Path(folder)
    config = PeftConfig.from_pretrained(str(folder))
    _check_config(config, folder)
    model_type = getattr(base_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"{folder}: base model type {model_type!r} has no llama.cpp mapping here; supported: "
            f"{sorted(ARCHITECTURES)}"
        )
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])
    names = gguf.get_tensor_name_map(arch, base_config.num_hidden_layers)
    tensors = io.load_weights_file(io.find_weights_file(str(folder)))
    alpha = float(config.lora_alpha)
    out: dict[str, np.ndarray] = {}
    for key in sorted(k for k in tensors if ".lora_A." in k or ".lora_embedding_A" in k):
        module = key.split(".lora_")[0].removeprefix("base_model.model.")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(
                f"{folder}: module {module!r} has no llama.cpp tensor; exclude it from target_modules"
            )
        scaling, r = _module_scaling(config, module)
        factor = scaling * r / alpha  # llama.cpp applies alpha / r
        if ".lora_embedding_A" in key:
            A, B = tensors[key].float(), tensors[key.replace("lora_embedding_A", "lora_embedding_B")].float()
            a, b = B.T.contiguous(), A.T.contiguous() * factor  # a (r, dim), b (vocab, r)
        else:
            a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float() * factor
            if a.dim() != 2:
                raise ExportError(
                    f"{folder}: module {module!r} is not a Linear/Conv1D layer (A is {tuple(a.shape)})"
                )
            b = _rotary_order(b, module, ARCHITECTURES[model_type], base_config)
        out[target + ".lora_a"] = a.numpy()
        out[target + ".lora_b"] = b.numpy()
    if not out:
        raise ExportError(f"{folder}: no LoRA tensors found")
    return gguf.MODEL_ARCH_NAMES[arch], alpha, out


def _rotary_order(b: torch.Tensor, module: str, arch: str, base_config: Any) -> torch.Tensor:
    if arch not in _ROTARY_PERMUTED:
        return b
    n_head = base_config.num_attention_heads
    if module.endswith("q_proj"):
        return _permute_rows(b, n_head)
    if module.endswith("k_proj"):
        return _permute_rows(b, getattr(base_config, "num_key_value_heads", None) or n_head)
    return b


def write_gguf_adapter(
    folder: str | os.PathLike, output: str | os.PathLike, base_config: Any, dtype: str = "f32"
) -> dict[str, Any]:
    """Write the llama.cpp adapter for `folder` to `output` (atomically); returns a summary."""
    import gguf

    arch, alpha, tensors = adapter_tensors(folder, base_config)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_string("general.name", Path(folder).resolve().name)
    for name, array in tensors.items():
        writer.add_tensor(name, array.astype(np.float16 if dtype == "f16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, output)
    return {"architecture": arch, "alpha": alpha, "tensors": len(tensors), "bytes": output.stat().st_size}
