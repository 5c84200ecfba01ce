"""Combining several task tensors (adapter weights or dense deltas) into one.

Every function takes `tensors`, a list of k tensors of one shape (...), and `weights`, k floats (or a
(k,) tensor), and returns one tensor of shape (...). The schemes:

- task arithmetic (`"linear"`): sum_i w_i * t_i.
- magnitude pruning: each t_i keeps its `density` fraction of largest-|.| entries, then the weighted sum.
- TIES: magnitude pruning, then per entry a majority sign is elected (from the pruned, unweighted tensors:
  the sign of their sum, `"total"`, or of their signs' sum, `"frequency"`), and the weighted entries that
  agree with it are averaged (entries nobody keeps stay 0).
- DARE: each entry of t_i is kept with probability `density` and rescaled by 1/density (so the expected
  value is unchanged), then the weighted sum (`dare_linear`) or the TIES election (`dare_ties`).

Random pruning draws from `generator` (the global torch RNG when None), one `bernoulli` per tensor in
list order, so a seeded call is reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

SCHEMES = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def _stack(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor):
    """(k, ...) stacked tensors and (k, 1, ..., 1) weights broadcastable against them."""
    stacked = torch.stack(list(tensors), dim=0)
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return stacked, w.reshape(w.shape + (1,) * (stacked.dim() - 1))


def _keep_all(density: float) -> bool:
    if not 0.0 <= density:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if density >= 1.0:
        warnings.warn(f"density={density} >= 1 keeps every entry: no pruning is done", stacklevel=3)
        return True
    return False


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` (...) with all but its int(density * numel) largest-magnitude entries set to 0."""
    if _keep_all(density):
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * keep.reshape(t.shape)


def random_prune_tensor(
    t: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`t` (...) with each entry kept with probability `density` and rescaled by 1 / density."""
    if _keep_all(density):
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """(k, ...) bool: entries of `stacked` (k, ...) whose sign equals the elected sign of their position."""
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    elected = torch.where(votes >= 0, 1, -1).to(stacked.dtype)
    return stacked.sign() == elected


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of `weighted` (k, ...) counting only entries where `mask` is true: (...)."""
    total = (weighted * mask).sum(dim=0)
    return total / mask.sum(dim=0).clamp(min=1).to(weighted.dtype)


def combine(
    scheme: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine k tensors of one shape (...) by `scheme` (one of `SCHEMES`); returns (...)."""
    if scheme not in SCHEMES:
        raise ValueError(f"combination scheme must be one of {SCHEMES}, got {scheme!r}")
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights; give one weight per adapter")
    if scheme != "linear":
        if density is None:
            raise ValueError(f"combination {scheme!r} prunes: pass density (the fraction kept, in [0, 1])")
        if scheme.startswith("dare"):
            tensors = [random_prune_tensor(t, density, generator) for t in tensors]
        else:
            tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    stacked, w = _stack(tensors, weights)
    if scheme.endswith("ties"):
        return disjoint_mean(stacked * w, majority_sign_mask(stacked, majority_sign_method))
    return (stacked * w).sum(dim=0)


def low_rank(
    delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True, driver=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `delta` (out, in) by SVD: (B (out, rank), A (rank, in)) with B @ A ~ delta.

    The singular values go into B. `clamp` (a quantile in (0, 1]) clips the entries of both factors to
    [-q, q], where q is that quantile of all their entries. Ranks above min(out, in) are padded with zeros.
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    keep = min(rank, S.shape[0])
    B = U[:, :keep] * S[:keep]
    A = Vh[:keep, :]
    if clamp is not None:
        bound = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-bound, bound), A.clamp(-bound, bound)
    if keep < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - keep)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - keep, A.shape[1])], dim=0)
    return B, A
