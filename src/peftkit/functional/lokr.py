"""LoKr math (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation"): the update is a Kronecker product of a small and a larger factor.

    dW = scale * kron(w1, w2)      w1 (out_l, in_m), w2 (out_k, in_n); out = out_l * out_k, in = in_m * in_n

Each factor is either a full matrix or a low-rank product `w_a @ w_b`; for Conv2d, w2 carries the kernel
(out_k, in_n, kh, kw) (optionally as a Tucker product with a core t2 (r, r, kh, kw)).
"""

from __future__ import annotations

import torch


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m * n == dimension.

    With `factor` > 0 dividing the dimension: (factor, dimension // factor). Otherwise the divisor pair
    closest to the square root whose smaller member does not exceed `factor` (-1: no limit), e.g.
    256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127). The same rule as HF peft, so shapes match its files.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (m, n) if m <= n else (n, m)


def tucker_weight(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """t (r, r, kh, kw), w_a (r, out_k), w_b (r, in_n) -> (out_k, in_n, kh, kw)."""
    return torch.einsum("ijkl,ip,jr->prkl", t, w_a, w_b)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * kron(w1, w2).

    Args:
        w1: (out_l, in_m). w2: (out_k, in_n) or, for a conv kernel, (out_k, in_n, kh, kw); a Conv1d's full w2
            is (out_k, in_n, k), and `torch.kron` then treats w1 as (1, out_l, in_m) (HF peft's layout: the
            caller reshapes the (out_k, out_l * in_n, in_m * k) result to the base weight's shape).
    Returns:
        (out_l * out_k, in_m * in_n[, kh, kw]), or the 3-d result above.
    """
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # a fresh dense copy: an einsum result can be "contiguous" with an odd stride on a size-1 dim (a Conv1d's
    # Tucker core at r=1), which torch.kron cannot view (HF peft 0.21 raises there)
    return torch.kron(w1, w2.clone(memory_format=torch.contiguous_format)) * scale
