"""Small helpers HF peft users call around training: preparing a (quantized) model and shifting decoder ids."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_QUANTIZED_FLAGS = ("is_loaded_in_8bit", "is_loaded_in_4bit")
_QUANTIZED_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq", "awq")  # their params must keep their dtype


def _quantization_method(model: nn.Module) -> str | None:
    quant = getattr(model, "quantization_method", None) or getattr(
        getattr(model, "config", None), "quantization_config", None
    )
    method = getattr(quant, "quant_method", quant if isinstance(quant, str) else None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a (usually 8/4-bit quantized) transformers model ready for adapter training; returns it.

    Every parameter is frozen; half-precision (fp16/bf16) parameters that are not quantized storage are
    cast to fp32 (norms and the head are unstable in half precision), except for the quantization methods
    whose packed tensors must keep their dtype (GPTQ, AWQ, ...). For a quantized model with
    `use_gradient_checkpointing`, gradient checkpointing is enabled (reentrant unless
    `gradient_checkpointing_kwargs` says otherwise) and the embedding output made to require grad, so the
    checkpointed blocks still produce adapter gradients.
    """
    quantized = any(getattr(model, flag, False) for flag in _QUANTIZED_FLAGS)
    method = _quantization_method(model)
    keeps_dtype = method in _QUANTIZED_METHODS
    for param in model.parameters():
        param.requires_grad_(False)
    if not keeps_dtype:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if (quantized or keeps_dtype) and use_gradient_checkpointing:
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def shift_tokens_right(
    input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int
) -> torch.Tensor:
    """Decoder inputs from labels: (batch, seq) -> (batch, seq), shifted one right with
    `decoder_start_token_id` first, and the label mask value -100 replaced by `pad_token_id`.

    Raises:
        ValueError: `pad_token_id` is None (the -100 positions would have no token).
    """
    if pad_token_id is None:
        raise ValueError("shift_tokens_right: pad_token_id is None; the model config must define one")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)
