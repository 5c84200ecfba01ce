"""Pieces shared by the LyCORIS methods (LoHa, LoKr): both build a dense update `dW` shaped like the base
weight, run it as a second Linear/Conv2d/Conv1d on the same input, and share rank dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def apply_delta(x: torch.Tensor, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """The update's contribution to the output: the base layer's operation with weight `delta`, no bias.

    Args:
        x: (..., in) for a Linear, (N, in, H, W) for a Conv2d, (N, in, L) for a Conv1d.
        delta: like the base weight, (out, in), (out, in / groups, kh, kw) or (out, in / groups, k).
    Returns:
        (..., out), (N, out, H', W') or (N, out, L').
    """
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)
    if isinstance(base, nn.Conv1d):
        return F.conv1d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, delta)


def rank_dropout(delta: torch.Tensor, p: float, rescale: bool) -> torch.Tensor:
    """Drop whole output rows of `delta` (out, ...) with probability p; with `rescale`, divide by the kept
    fraction so the expected update is unchanged."""
    keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(1e-12)
    return delta * keep.view(-1, *([1] * (delta.dim() - 1)))
