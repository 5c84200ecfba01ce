"""Reshaping a batched, left-padded KV cache as requests join and leave (continuous batching).

The cache is transformers' `DynamicCache`; each layer holds keys and values of shape (B, heads, T, head_dim),
row b's real tokens at the right end of T and zeros (masked out) on the left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise ValueError(
            "continuous batching needs a full-attention KV cache (DynamicLayer); this model's cache is "
            f"{[type(layer).__name__ for layer in layers or []]}"
        )
    return layers


def pad_left(cache, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad every layer of `cache` and `mask` (B, T) to `length` positions; returns the new mask."""
    extra = length - mask.shape[1]
    if extra > 0:
        for layer in _layers(cache):
            layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
            layer.values = F.pad(layer.values, (0, 0, extra, 0))
        mask = F.pad(mask, (extra, 0))
    return mask


def concat(cache, other) -> None:
    """Append the rows of `other` (same T) to `cache`, in place."""
    for mine, theirs in zip(_layers(cache), _layers(other)):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)


def keep_rows(cache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep only `rows` (indices) of `cache` and `mask` (B, T), then drop the leading positions that are padding
    in every remaining row; returns the new mask."""
    layers = _layers(cache)
    mask = mask.index_select(0, rows)
    first_real = int((mask.cumsum(dim=1) == 0).sum(dim=1).min()) if mask.numel() else 0
    for layer in layers:
        layer.keys = layer.keys.index_select(0, rows)[:, :, first_real:]
        layer.values = layer.values.index_select(0, rows)[:, :, first_real:]
    return mask[:, first_real:]
