"""Trainable tokens: new values for a few rows of an embedding table (and of a tied output head).

The adapter holds `delta` (k, dim): the full replacement rows for the token ids `indices` (k,), not a
difference. Replacing rows in the layer's output, instead of building a patched copy of the whole
(vocab, dim) table, keeps the cost at O(tokens * dim) for any vocabulary size.
"""

from __future__ import annotations

import torch


def replace_rows(weight: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The table with rows `indices` replaced: weight (vocab, dim), indices (k,), delta (k, dim) -> (vocab, dim)."""
    return weight.index_copy(0, indices, delta.to(weight.dtype))


def embed_replaced(
    ids: torch.Tensor, base_out: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor, vocab: int
) -> torch.Tensor:
    """An embedding lookup whose rows `indices` come from `delta`.

    Args:
        ids: token ids (...). base_out: the base lookup (..., dim), already scaled like `delta` must be.
        indices: (k,) token ids with new rows. delta: (k, dim). vocab: the table's number of rows.
    Returns:
        (..., dim): base_out, with delta's row where an id is one of `indices`.
    """
    slot = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
    slot[indices] = torch.arange(indices.numel(), device=ids.device)
    pos = slot[ids]  # (...) position in delta, or -1
    rows = delta.to(base_out.dtype)[pos.clamp(min=0)]
    return torch.where((pos >= 0).unsqueeze(-1), rows, base_out)


def head_replaced(
    x: torch.Tensor,
    base_out: torch.Tensor,
    indices: torch.Tensor,
    delta: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """An output head (tied to the embedding) whose weight rows `indices` come from `delta`.

    Args:
        x: (..., dim). base_out: x @ W.T (+ bias), (..., vocab). indices: (k,). delta: (k, dim).
    Returns:
        (..., vocab) with columns `indices` recomputed as x @ delta.T (+ bias[indices]).
    """
    cols = x.to(delta.dtype) @ delta.T
    if bias is not None:
        cols = cols + bias[indices].to(cols.dtype)
    return base_out.index_copy(-1, indices, cols.to(base_out.dtype))
