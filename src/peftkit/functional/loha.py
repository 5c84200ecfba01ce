"""LoHa math (Hyeon-Woo et al. 2022, "FedPara"): the update is the elementwise (Hadamard) product of two
low-rank matrices, so rank r per factor gives an update of rank up to r^2.

    dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b)                   Linear: w*_a (out, r), w*_b (r, in)

For a Conv2d with `use_effective_conv2d`, each factor is a CP/Tucker product with a core t (r, r, kh, kw),
w*_a (r, out) and w*_b (r, in), giving a factor (out, in, kh, kw).
"""

from __future__ import annotations

import torch


def hadamard_delta(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """w*_a (out, r), w*_b (r, in) -> (out, in)."""
    return (w1_a @ w1_b) * (w2_a @ w2_b) * scale


def tucker_factor(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """One factor from its core: t (r, r, kh, kw), w_a (r, out), w_b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, w_b, w_a)


def hadamard_delta_cp(
    t1: torch.Tensor,
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    t2: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The effective-conv form: two `tucker_factor`s multiplied elementwise -> (out, in, kh, kw)."""
    return tucker_factor(t1, w1_a, w1_b) * tucker_factor(t2, w2_a, w2_b) * scale
