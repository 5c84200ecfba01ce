"""Orthogonal fine-tuning math (OFT and BOFT): skew-symmetric parameters -> Cayley rotations -> block-diagonal
(optionally butterfly-permuted) rotations applied to activations or weights.

Shapes: `n` features split into `D` blocks of size `b` (n = D * b). A rotation is `D` blocks (D, b, b); BOFT
stacks `m` butterfly factors (m, D, b, b), each conjugated by a fixed permutation of the `n` features.

Conventions (both libraries' layouts): activations are rows, so a rotation acts as `x @ R` on x (..., n); a
weight with input features as columns (Linear (out, n), flattened Conv2d (out, C*kh*kw)) is merged as
`W @ R^T`, so `base(x @ R) == x @ (W @ R^T)^T`.
"""

from __future__ import annotations

import torch


def skew_from_triu(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """OFT's parameterisation: (D, b*(b-1)/2) strict upper triangles -> skew-symmetric (D, b, b) `A - A^T`."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def triu_of(skew: torch.Tensor) -> torch.Tensor:
    """Inverse of `skew_from_triu`: (D, b, b) -> (D, b*(b-1)/2)."""
    b = skew.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=skew.device)
    return skew[:, rows, cols]


def skew_from_square(data: torch.Tensor) -> torch.Tensor:
    """BOFT's parameterisation: any (..., b, b) -> its skew-symmetric part `(A - A^T) / 2`."""
    return 0.5 * (data - data.transpose(-2, -1))


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform (I - S)(I + S)^-1 of skew-symmetric (..., b, b): an orthogonal (..., b, b)."""
    work = skew if skew.dtype in (torch.float32, torch.float64) else skew.float()  # no half-precision `lu`
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=work.dtype).expand_as(work)
    return torch.linalg.solve(eye + work, eye - work, left=False).to(skew.dtype)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """Truncated Neumann series of the Cayley transform of `-S` (HF peft >= 0.18's formula, kept identical
    so adapters load with the same outputs): I + 2S + 2S^2 + ... + 2S^(k-1) + S^k, where k = max(terms-1, 3)
    for terms >= 3 (terms=2: I + 2S; terms=1: I). Approximately orthogonal, no matrix inverse."""
    out = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew).clone()
    if terms <= 1:
        return out
    out = out + 2.0 * skew
    if terms == 2:
        return out
    power = skew @ skew
    out = out + 2.0 * power
    for _ in range(3, terms - 1):
        power = power @ skew
        out = out + 2.0 * power
    return out + power @ skew


def coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """Constrained OFT: shrink each block's skew matrix to Frobenius norm <= eps / sqrt(D). (D, E) -> (D, E)."""
    skew = skew_from_triu(vec, block_size)
    eps = eps / (skew.shape[0] ** 0.5)
    norm = torch.linalg.matrix_norm(skew, keepdim=True)
    return triu_of(torch.where(norm <= eps, skew, eps * skew / norm))


def multiplicative_dropout(blocks: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Replace int(p * D) random blocks of one random butterfly factor by the identity (training only).

    blocks: (m, D, b, b) -> same shape. With a single block (D == 1) nothing is dropped.
    """
    m, d, b, _ = blocks.shape
    k = int(p * d)
    if not training or k == 0 or d == 1:
        return blocks
    mask = torch.zeros(m, d, 1, 1, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randint(0, m, (1,)).item(), torch.randperm(d, device=blocks.device)[:k]] = 1
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ block_diag(*blocks) without building the dense matrix. x (..., D*b), blocks (D, b, b) -> (..., D*b)."""
    d, b, _ = blocks.shape
    y = torch.einsum("...dk,dkc->...dc", x.reshape(*x.shape[:-1], d, b), blocks)
    return y.reshape(x.shape)


def butterfly_perms(n: int, block_num: int, block_size: int, factors: int) -> torch.Tensor:
    """The permutation of each butterfly factor: (factors, n) indices, `perm[i][j]` = the source feature of j.

    Factor i works on groups of `n / (block_num / 2^i)` features: inside each group the half-block chunks
    (size block_size / 2) are reordered evens-first, so factor i's blocks pair features 2^i half-blocks apart.
    One factor (plain block-diagonal OFT) is the identity.
    """
    perms = torch.arange(n).repeat(factors, 1)
    if factors == 1:
        return perms
    half = block_size // 2
    for i in range(factors):
        group = n // (block_num // 2**i)
        chunks = group // half
        order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
        within = (order[:, None] * half + torch.arange(half)).flatten()
        perms[i] = (torch.arange(0, n, group)[:, None] + within).flatten()
    return perms


def butterfly_apply(
    x: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, reverse: bool
) -> torch.Tensor:
    """x @ F_a @ F_b @ ... for the factors F_i = P_i block_diag(blocks[i]) P_i^T.

    x (..., n), blocks (m, D, b, b), perms (m, n). `reverse=True` multiplies F_{m-1} first, i.e. x @ M with
    M = F_{m-1} ... F_0 (the BOFT rotation); `reverse=False` multiplies F_0 first.
    """
    order = range(blocks.shape[0] - 1, -1, -1) if reverse else range(blocks.shape[0])
    for i in order:
        perm = perms[i]
        identity = bool((perm == torch.arange(perm.numel(), device=perm.device)).all())
        x = x if identity else x[..., torch.argsort(perm)]
        x = apply_blocks(x, blocks[i])
        x = x if identity else x[..., perm]
    return x


def rotate_rows(weight: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Merge: W (out, n) -> W @ M^T for M = F_{m-1} ... F_0 (see `butterfly_apply`)."""
    return butterfly_apply(weight, blocks.transpose(-2, -1), perms, reverse=False)


def unrotate_rows(weight: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Unmerge: W (out, n) -> W @ M^-T, inverting each small block (exact even when the Cayley-Neumann
    series leaves the blocks only approximately orthogonal, where the transpose would not undo the merge)."""
    inv = torch.linalg.inv(blocks.double()).to(blocks.dtype)
    return butterfly_apply(weight, inv.transpose(-2, -1), perms, reverse=True)
