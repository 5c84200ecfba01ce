"""peftkit's attention kernels as transformers attention functions, with transformers' SDPA as the fallback.

A kernel registered with `register(name, applies, kernel)` is called by every attention layer whose config's
implementation is `name` (`fast_attention.py`, `packed_attention.py` switch it on for one call). transformers
hands the function (module, query (B, H, T, D), key / value (B, KV, S, D), attention_mask, dropout, scaling,
is_causal, **kwargs); the kernel runs when `applies(...)` says it computes exactly what `sdpa_attention_forward`
would, and `sdpa_attention_forward` runs otherwise. The mask is built as for "sdpa".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# kwargs an attention function may receive that sdpa ignores as well
IGNORED_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "num_items_in_batch"})


def unusual(kwargs: dict[str, Any]) -> bool:
    """Whether kwargs ask for something sdpa would do and a plain kernel would not (softcap, sliding window,
    sinks, position bias, output_attentions, anything new)."""
    return any(v is not None and v is not False for k, v in kwargs.items() if k not in IGNORED_KWARGS)


class Call(NamedTuple):
    """One call of an attention function, as transformers makes it."""

    module: nn.Module
    query: torch.Tensor  # (B, H, T, D)
    key: torch.Tensor  # (B, KV, S, D)
    value: torch.Tensor  # (B, KV, S, D)
    attention_mask: torch.Tensor | None
    dropout: float
    is_causal: bool | None
    kwargs: dict[str, Any]


Applies = Callable[[Call], bool]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]


def register(name: str, applies: Applies, kernel: Kernel) -> Callable[..., tuple[torch.Tensor, None]]:
    """Register `name` with transformers: `kernel(query, key, value, attention_mask, scale)` -> (B, T, H, D)
    where `applies(Call(...))`, sdpa elsewhere. Returns the attention function."""

    def attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if not applies(Call(module, query, key, value, attention_mask, dropout, is_causal, kwargs)):
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return kernel(query, key, value, attention_mask, scale), None

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return attention_forward
