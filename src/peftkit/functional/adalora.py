"""AdaLoRA math (Zhang et al., 2023): an SVD-shaped update `B @ diag(E) @ A` whose singular values E are
pruned to a shrinking rank budget by importance scores.

Shapes: A (r, in), E (r, 1), B (out, r).
"""

from __future__ import annotations

import torch

EPS = 1e-5  # keeps the rank normaliser away from zero, as in the reference


def svd_delta(
    A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scaling: float, ranknum: float
) -> torch.Tensor:
    """The dense update (out, in) = B @ (A * E) * scaling / (ranknum + EPS)."""
    return (B @ (A * E)) * (scaling / (ranknum + EPS))


def svd_forward(
    x: torch.Tensor, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scaling: float, ranknum: float
) -> torch.Tensor:
    """x (..., in) -> the update's output (..., out), without forming the dense delta."""
    return (x @ (A * E).T @ B.T) * (scaling / (ranknum + EPS))


def orthogonal_penalty(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> torch.Tensor | float:
    """Mean Frobenius distance of A A^T and B^T B from the identity (keeps P and Q near-orthogonal)."""
    terms = []
    for A in As:
        cov = A @ A.T
        terms.append(
            torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
        )
    for B in Bs:
        cov = B.T @ B
        terms.append(
            torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
        )
    return torch.stack(terms).mean() if terms else 0.0


def budget_at(
    step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int, delta_t: int
) -> tuple[int, bool]:
    """(rank budget at `step`, whether to re-mask now): flat during warm-up, cubic decay to the target, then
    fixed at the target for the last `tfinal` steps."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % delta_t == 0


def triplet_scores(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """Importance of each rank-1 triplet (r,): E's score plus the mean score of its row of A and column of B."""
    return score_E.view(-1) + score_A.mean(dim=1) + score_B.mean(dim=0)
