"""VeRA math (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation").

All adapted layers share two frozen random matrices, `A` (r, max_in) and `B` (max_out, r), drawn once from a
seeded generator; a layer with weight (out, in) uses the slices `A[:, :in]` and `B[:out, :]` and learns only
two vectors, `lambda_d` (r,) and `lambda_b` (out,). The update is

    dW = diag(lambda_b) @ B @ diag(lambda_d) @ A            (out, in)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in = shape[1] (Kaiming, gain sqrt(2)), drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, in_dim: int, out_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair, reproducible from `seed` (A is drawn first, then B; HF peft's order).

    Returns:
        A (r, in_dim), B (out_dim, r), float32 on the CPU.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = kaiming_uniform((r, in_dim), generator)
    B = kaiming_uniform((out_dim, r), generator)
    return A, B


def delta(A: torch.Tensor, B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """The dense update of one layer.

    Args:
        A: (r, in), the layer's slice of the shared A. B: (out, r), its slice of B.
        lambda_d: (r,). lambda_b: (out,).
    Returns:
        (out, in) = (lambda_b[:, None] * B) @ (lambda_d[:, None] * A).
    """
    return (lambda_b.unsqueeze(-1) * B) @ (lambda_d.unsqueeze(-1) * A)


def apply(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor
) -> torch.Tensor:
    """`x @ delta(...).T` without forming the (out, in) matrix. x: (..., in) -> (..., out)."""
    return lambda_b * F.linear(lambda_d * F.linear(x, A), B)
