"""When `PeftModelForCausalLM.forward` swaps transformers' SDPA attention for the blocked causal kernel.

During a training forward (module in train mode, grad enabled) every config of the base model whose
attention implementation is exactly "sdpa" is switched to "peftkit_sdpa" for the duration of the call and
restored afterwards (also when the forward raises). "peftkit_sdpa" is registered with transformers'
`AttentionInterface` and builds its masks exactly as "sdpa" does (`AttentionMaskInterface`); per call it runs
`functional.causal_attention.blocked_causal_attention` when that is exact and measured faster (CPU, fp32,
gradients needed, no dropout, a causal module, more than one query, nothing unusual in the kwargs, a mask
that only hides keys causality allows) and transformers' own `sdpa_attention_forward` otherwise. Outputs and
gradients equal sdpa's within fp32 rounding.

OFF by default (opt in with `peftkit.set_fast_attention(True)`; `model.fast_attention = False` keeps one model
out), and never under gradient checkpointing (see `_checkpointing`). Measured on SmolLM2-135M LoRA all-linear at 4x512: the kernel's forward+backward is 0.75-0.85x of
PyTorch's flash kernel per layer at 448-640 queries, but a whole training step is unchanged (10.18 s on vs
10.23 s off, idle machine), and when other processes compete for the cores its many small ops stall under
PyTorch's default OpenMP spin-waiting (one 4x512 layer: 4.5 s vs 0.16 s for flash) unless
OMP_WAIT_POLICY=PASSIVE is set, which a library cannot do for its users.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .attention_functions import Call, register, unusual
from .functional.causal_attention import blocked_causal_attention
from .hf_compat import configs_of

NAME = "peftkit_sdpa"
_enabled = False


def set_fast_attention(enabled: bool) -> None:
    """Switch the blocked causal attention for training forwards on or off (default) for every model."""
    global _enabled
    _enabled = bool(enabled)


def fast_attention_enabled() -> bool:
    return _enabled


# Measured (2 threads, SmolLM2 heads: H=9, KV=3, D=64), forward + backward of one layer against PyTorch's
# flash kernel: faster at 512 queries (0.75-0.85x at batch 4 and 8); about even at 384; slower at 128 and 256
# (small blocks, many ops) and from 768 on (whole-row score blocks are memory bound where flash stays in
# cache). No-grad forwards gain little or lose, so they stay on sdpa.
MIN_QUERIES = 448
MAX_QUERIES = 640


def block_size(q_len: int) -> int:
    """Queries per block of the blocked kernel (measured: 32 is best or within noise at 512 to 2048)."""
    return 32


_last_mask_check: tuple[weakref.ref, int, bool] | None = None


def _mask_within_causal(mask: torch.Tensor) -> bool:
    """True if the bool mask (..., T, S) hides every key after a query's position (query i at S - T + i).

    One mask object is passed to every layer of a forward, so the answer for the last mask is remembered.
    """
    global _last_mask_check
    if _last_mask_check is not None:
        ref, version, answer = _last_mask_check
        if ref() is mask and version == mask._version:
            return answer
    t, s = mask.shape[-2:]
    future = torch.ones(t, s, dtype=torch.bool, device=mask.device).triu_(s - t + 1)
    answer = not bool((mask & future).any())
    _last_mask_check = (weakref.ref(mask), mask._version, answer)
    return answer


def _blocked_applies(call: Call) -> bool:
    """Whether the blocked kernel computes exactly what `sdpa_attention_forward` would, and is faster."""
    module, query, key, value, attention_mask, dropout, is_causal, kwargs = call
    if query.device.type != "cpu" or query.dtype != torch.float32 or dropout != 0.0:
        return False
    if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return False
    if unusual(kwargs):
        return False
    if is_causal is False or getattr(module, "is_causal", False) is not True:
        return False
    b, h, t, d = query.shape
    if (
        not max(2, MIN_QUERIES) <= t <= MAX_QUERIES
        or key.shape != value.shape
        or key.shape[-1] != d
        or h % key.shape[1]
    ):
        return False
    if attention_mask is None:  # sdpa aligns is_causal top-left: equal to ours only when S == T
        return key.shape[2] == t
    return (
        attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and attention_mask.shape[-2:] == (t, key.shape[2])
        and _mask_within_causal(attention_mask)
    )


def _blocked(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """query (B, H, T, D), key / value (B, KV, S, D) -> (B, T, H, D) by the blocked causal kernel."""
    out = blocked_causal_attention(query, key, value, scale, mask, block_size(query.shape[2]))
    return out.transpose(1, 2).contiguous()


peftkit_sdpa_attention_forward = register(NAME, _blocked_applies, _blocked)


def _checkpointing(base: nn.Module) -> bool:
    """Whether gradient checkpointing is on in `base`. The backward then recomputes each layer after this
    context has restored "sdpa", so a forward with the blocked kernel would differ from its recomputation
    (non-reentrant checkpointing raises CheckpointError; reentrant would mix the two kernels' gradients):
    the swap is skipped, and checkpointed training runs sdpa throughout."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


@contextmanager
def fast_attention(model: nn.Module, base: nn.Module) -> Iterator[None]:
    """Within: `base`'s "sdpa" configs use "peftkit_sdpa", when `model` (a PeftModel) is in a training forward.

    Each config's own implementation is set (`_attn_implementation_internal`), not the recursive property,
    so a sub-config with another implementation keeps it.
    """
    if not (
        _enabled
        and getattr(model, "fast_attention", True)
        and model.training
        and torch.is_grad_enabled()
        and not _checkpointing(base)
    ):
        yield
        return
    switched = [
        c
        for c in configs_of(base)
        if hasattr(c, "_attn_implementation_internal") and c._attn_implementation_internal == "sdpa"
    ]
    for config in switched:
        config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for config in switched:
            config._attn_implementation_internal = "sdpa"
