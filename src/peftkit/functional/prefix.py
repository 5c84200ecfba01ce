"""Prefix tuning's tensor layout: one flat row per virtual token -> per-layer key/value tensors.

The layout is HF peft's (so a saved `prompt_embeddings` means the same thing in both libraries): a row of
`num_layers * 2 * token_dim` numbers holds, in order, the key and the value of every layer, each split into
`num_heads` heads of `token_dim // num_heads`. For encoder-decoder models (`num_submodules == 2`) HF peft walks
the same list twice, four entries per layer (self-attention key/value, cross-attention key/value); only the
self-attention pair is used (the cross-attention cache is recomputed from the real encoder output).
"""

from __future__ import annotations

import torch


def prefix_key_values(
    prefix: torch.Tensor, num_layers: int, num_heads: int, num_submodules: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split prefix rows into one (key, value) pair per decoder layer.

    Args:
        prefix: (batch, num_virtual_tokens, num_layers * 2 * token_dim).
        num_layers: decoder layers.
        num_heads: heads of the cached keys (`num_key_value_heads` for grouped-query attention).
        num_submodules: 1 for decoder-only models, 2 for encoder-decoder ones (HF peft's walk, see module doc).

    Returns:
        `num_layers` pairs of tensors shaped (batch, num_heads, num_virtual_tokens, head_dim).
    """
    batch, tokens, width = prefix.shape
    entries = 2 * num_layers
    if width % (entries * num_heads):
        raise ValueError(
            f"prefix width {width} is not num_layers*2*num_heads*head_dim for num_layers={num_layers}, "
            f"num_heads={num_heads}"
        )
    # (2 * layers, batch, heads, tokens, head_dim): entry e is layer e // 2's key (even) or value (odd)
    kv = prefix.view(batch, tokens, entries, num_heads, -1).permute(2, 0, 3, 1, 4)
    stride = 2 * num_submodules
    return [(kv[(stride * i) % entries], kv[(stride * i + 1) % entries]) for i in range(num_layers)]
