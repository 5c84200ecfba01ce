"""A whole (merged) model as one llama.cpp GGUF: hyperparameters, weights under llama.cpp's names, tokenizer.

Weights are named with `gguf.get_tensor_name_map` (the map llama.cpp's own converter uses); the query/key
projections of Llama-family models get llama.cpp's rotary row order (see `gguf_adapter._permute_rows`); a
tied output head is left out (llama.cpp reuses `token_embd.weight`). Matrices are stored as F32, F16 or Q8_0
(quantized with `gguf.quants`, blocks of 32 along the input dimension); norms and biases always as F32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .gguf_adapter import ExportError, _permute_rows
from .gguf_tokenizer import add_tokenizer

# HF model_type -> (gguf.MODEL_ARCH member, rows of q/k permuted for rotary)
MODEL_ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
DTYPES = ("f32", "f16", "q8_0")


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ExportError(f"rope type {kind!r} is not exported to GGUF here (only the default rotary)")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def _add_hparams(writer: Any, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tensor_data(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for one tensor: 1-D and norms F32; matrices in `dtype`."""
    import gguf

    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:
        raise ExportError(f"{name}: row length {array.shape[-1]} is not a multiple of 32, which Q8_0 needs")
    kind = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array, kind), kind


def write_gguf_model(
    state_dict: dict[str, torch.Tensor],
    config: Any,
    tokenizer_folder: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "f16",
    tokenizer_pre: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Write a causal LM (`state_dict` of its HF module, `config`) and its tokenizer as one GGUF at `output`,
    atomically; returns {"architecture", "tensors", "bytes"}."""
    import gguf

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_ARCHITECTURES:
        raise ExportError(
            f"merged GGUF export supports model types {sorted(MODEL_ARCHITECTURES)}; this base is {model_type!r}"
        )
    arch_name, permuted = MODEL_ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type("model")
        writer.add_name(name or Path(output).stem)
        _add_hparams(writer, config)
        writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[dtype])
        add_tokenizer(writer, tokenizer_folder, config.vocab_size, tokenizer_pre)
        count = 0
        for key, tensor in state_dict.items():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise ExportError(f"tensor {key!r} has no llama.cpp name for architecture {arch_name}")
            if permuted and key.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _permute_rows(tensor, n_head)
            elif permuted and key.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _permute_rows(tensor, n_kv)
            array, raw = _tensor_data(key, tensor, dtype)
            writer.add_tensor(target, array, raw_dtype=raw)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "tensors": count, "bytes": output.stat().st_size}


def modelfile_for_merged(gguf_path: str | os.PathLike, chat_template: str | None) -> str:
    """An Ollama Modelfile for the merged GGUF: FROM, plus a ChatML TEMPLATE and stop when the model's chat
    template is ChatML (Ollama templates are Go templates; other chat formats are left to Ollama's own
    detection from the GGUF's `tokenizer.chat_template`)."""
    lines = [f"FROM {Path(gguf_path).resolve()}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines += [
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
            "{{ .Content }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    return "\n".join(lines) + "\n"
