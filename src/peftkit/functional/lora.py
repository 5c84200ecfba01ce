"""LoRA, rsLoRA and DoRA math.

Notation: a frozen weight `W` of shape (out, in) (a Conv2d weight is (out, in, kh, kw)), a down-projection
`A` (r, in) and an up-projection `B` (out, r). LoRA adds `scaling * B @ A` to `W`; DoRA rescales each output
row of `W + scaling * B @ A` to a learned magnitude `m` (out,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """`alpha / r` (LoRA) or `alpha / sqrt(r)` (rsLoRA, stable at high rank)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def linear_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update of a Linear layer.

    Args:
        A: (r, in). B: (out, r).
    Returns:
        (out, in) = scaling * B @ A, in the dtype of A.
    """
    return (B @ A) * scaling


def conv2d_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update of a Conv2d layer: A (r, in, kh, kw) followed by a 1x1 B (out, r, 1, 1).

    Returns:
        (out, in, kh, kw).
    """
    return torch.einsum("or,rihw->oihw", B.flatten(1), A) * scaling


def embedding_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update of an Embedding whose table is (num_embeddings, dim).

    Args:
        A: (r, num_embeddings). B: (dim, r).
    Returns:
        (num_embeddings, dim).
    """
    return (B @ A).T * scaling


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row: weight (out, ...) -> (out,)."""
    return weight.flatten(1).norm(p=2, dim=1)


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape an (out,) vector to broadcast over a weight shaped (out, ...)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def dora_merge(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA's merged weight `m * (W + dW) / ||W + dW||_row`.

    Args:
        weight: W (out, ...). delta: dW, same shape. magnitude: m (out,).
    Returns:
        (merged weight like W, the row norms (out,) needed to undo the merge exactly).
    """
    combined = weight + delta
    norm = row_norm(combined)
    return combined * _per_row(magnitude / norm, combined), norm


def dora_unmerge(
    merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """Invert `dora_merge` with the norms it returned: W = merged * norm / m - dW."""
    return merged * _per_row(norm / magnitude, merged) - delta


def dora_output(
    base_out: torch.Tensor,
    base_no_bias: torch.Tensor,
    lora_out: torch.Tensor,
    weight_norm: torch.Tensor,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """DoRA's layer output from the unmerged pieces, equal to running the merged weight.

    Args:
        base_out: the frozen layer's output incl. bias, (..., out) (channels-first (N, out, H, W) for conv).
        base_no_bias: the frozen layer's output without bias on the same (dropped-out) input, like base_out.
        lora_out: scaling * B(A(x)), like base_out.
        weight_norm: ||W + scaling * B @ A||_row (out,), detached (the DoRA paper, section 4.3).
        magnitude: m (out,).
    Returns:
        Like base_out: base_out + (m/n - 1) * base_no_bias + (m/n) * lora_out.
    """
    scale = magnitude / weight_norm
    if base_out.dim() == 4:  # conv: channels in dim 1
        scale = scale.reshape(1, -1, 1, 1)
    return base_out + (scale - 1) * base_no_bias + scale * lora_out


def embed_with(x: torch.Tensor, table: torch.Tensor, base: torch.nn.Embedding) -> torch.Tensor:
    """Look rows of `table` (num_embeddings, d) up with the base embedding's options. x: (...) -> (..., d)."""
    return F.embedding(
        x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )


def stacked_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, experts: int) -> torch.Tensor:
    """The update of a stack of `experts` weights (LoRA on an MoE parameter), one rank-r pair per expert,
    held in two matrices laid out as HF peft's files have them.

    Args:
        A: (experts * r, in), expert-major rows: rows e*r .. e*r+r-1 belong to expert e.
        B: (out, r * experts), expert-minor columns: column j*experts + e is rank j of expert e.
    Returns:
        (experts, out, in): scaling * B_e @ A_e for each expert e.
    """
    a = A.reshape(experts, -1, A.shape[-1])  # (E, r, in)
    b = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
    return torch.bmm(b, a) * scaling
