"""LoftQ (Li et al., 2023): initialise LoRA so that a quantized base plus the adapter approximates the original
weight, by alternating quantization and a rank-r SVD of the residual.

Quantization here is NormalFloat ("NF4" at 4 bits, as QLoRA defines it): 2**bits levels placed at quantiles of a
standard normal (an exact zero, 2**(bits-1) positive and 2**(bits-1) - 1 negative levels, scaled to [-1, 1]),
blockwise absmax scaling (blocks of 64 values), round to the nearest level. Pure torch, any device.
"""

from __future__ import annotations

import torch

BLOCK = 64


def nf_levels(bits: int) -> torch.Tensor:
    """The 2**bits NormalFloat levels in [-1, 1], ascending (bits=4: QLoRA's NF4 table)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"NormalFloat quantization supports 2, 3, 4 or 8 bits, got {bits}")
    offset = 0.9677083  # QLoRA's: the outermost quantile used (the average of 1-1/(2*15) and 1-1/(2*16))
    half = 2 ** (bits - 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def nf_quantize(w: torch.Tensor, bits: int = 4, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NormalFloat codes of `w` (any shape; numel divisible by `block`).

    Returns:
        (codes (numel,) uint8 level indices, absmax (numel / block,) float32 per-block scales).
    """
    if w.numel() % block:
        raise ValueError(f"nf_quantize: {w.numel()} values do not split into blocks of {block}")
    x = w.detach().float().reshape(-1, block)
    absmax = x.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    levels = nf_levels(bits).to(x.device)
    mids = (levels[1:] + levels[:-1]) / 2  # round to nearest: bucketize on the midpoints
    codes = torch.bucketize((x / absmax[:, None]).contiguous(), mids)
    return codes.reshape(-1).to(torch.uint8), absmax


def nf_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, bits: int = 4, block: int = BLOCK
) -> torch.Tensor:
    """Inverse of `nf_quantize`: float32 tensor of `shape`."""
    levels = nf_levels(bits).to(codes.device)
    return (levels[codes.long()].reshape(-1, block) * absmax[:, None]).reshape(shape)


def nf_round_trip(w: torch.Tensor, bits: int = 4, block: int = BLOCK) -> torch.Tensor:
    """dequantize(quantize(w)) in float32, shape of w: what a NormalFloat-quantized base layer computes with.
    A last partial block is padded with zeros (which do not change its absmax)."""
    flat = w.detach().float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % block))
    out = nf_dequantize(*nf_quantize(padded, bits, block), padded.shape, bits, block)
    return out[: flat.numel()].reshape(w.shape)


def low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of residual (out, in) by SVD, split symmetrically: (L (out, r), R (r, in)), L @ R ~ residual."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def loftq(
    weight: torch.Tensor, r: int, bits: int = 4, iters: int = 1, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating minimisation of ||W - (Q + L @ R)||_F.

    Each iteration quantizes what the low-rank part does not explain (W - L @ R; W itself at first), then
    refits L @ R to the new quantization residual W - Q.

    Args:
        weight: W (out, in). r: the LoRA rank. bits: quantization bits. iters: alternations (>= 1).
    Returns:
        (Q (out, in) dequantized, float32; L (out, r); R (r, in)).
    """
    if iters < 1:
        raise ValueError(f"loftq: iters must be >= 1, got {iters}")
    w = weight.detach().float()
    target = w
    for _ in range(iters):
        q = nf_round_trip(target, bits, block)
        L, R = low_rank(w - q, r)
        target = w - L @ R
    return q, L, R
