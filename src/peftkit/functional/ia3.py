"""(IA)^3 math: a learned vector `vec` (`ia3_l`) rescales a layer's output features, or (for feed-forward layers) its
input features.

Shapes of `vec` (HF peft's, so files match): Linear / Conv1D (out, 1), or (1, in) for a feed-forward layer;
Conv2d (1, out, 1, 1), or (1, in, 1, 1). Scaling the output by `vec` equals scaling the weight's output rows
(and the bias); scaling the input equals scaling the weight's input columns, which is what merging does.
"""

from __future__ import annotations

import torch

# Unmerging divides by `vec`; like HF peft, guard against exact zeros (the result is then inexact).
UNMERGE_EPS = 1e-8


def activation_factor(vec: torch.Tensor) -> torch.Tensor:
    """`vec` shaped to broadcast over activations: (features,) for (..., features) inputs of Linear/Conv1D;
    unchanged (1, C, 1, 1) for channels-first (N, C, H, W) conv activations."""
    return vec if vec.dim() == 4 else vec.flatten()


def weight_factor(vec: torch.Tensor, is_feedforward: bool, transposed: bool) -> torch.Tensor:
    """`vec` shaped to broadcast over the base weight so that `W * factor` is the merged weight.

    Args:
        vec: the stored vector (shapes in the module docstring).
        is_feedforward: True when `vec` scales the input features.
        transposed: True for GPT-2 Conv1D, whose weight is (in, out).
    Returns:
        Linear: (out, 1) or (1, in). Conv1D: (1, out) or (in, 1). Conv2d: (out, 1, 1, 1) or (1, in, 1, 1).
    """
    if transposed:
        return vec.T
    if vec.dim() == 4 and not is_feedforward:
        return vec.transpose(0, 1)
    return vec


def scale(x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Multiply activations (input of a feed-forward layer, output of any other) by `vec`. x: (..., F) or
    (N, C, H, W); returns the same shape."""
    return x * activation_factor(vec)


def merge(weight: torch.Tensor, vec: torch.Tensor, is_feedforward: bool, transposed: bool) -> torch.Tensor:
    """The weight that computes `scale(...)` without the adapter: `W * vec` along the scaled dimension."""
    return weight * weight_factor(vec, is_feedforward, transposed).to(weight.dtype)


def unmerge(weight: torch.Tensor, vec: torch.Tensor, is_feedforward: bool, transposed: bool) -> torch.Tensor:
    """Invert `merge` (up to the zero guard): `W / (vec + eps)`."""
    return weight / (weight_factor(vec, is_feedforward, transposed).to(weight.dtype) + UNMERGE_EPS)
