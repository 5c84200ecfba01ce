"""A Linear layer plus its dropout-free LoRA adapters as one GEMM each way: `x @ (W + sum_k s_k B_k A_k).T + b`.

Without dropout the adapted layer is exactly a linear map with the effective weight W_eff = W + s B A (up to
fp32 rounding). Computing it that way costs out*in*r flops to build W_eff, and in exchange drops the skinny
rank-r GEMMs that run far below peak on CPU: forward loses `h @ B.T`, backward loses `g_h @ A` and the
(N, in) add of the branch's grad_x into the base layer's. W_eff is rebuilt in backward rather than saved
(saving it would hold a model-size of extra memory across layers); the saved tensors are x, W, A and B
(the frozen base linear keeps the same), so peak memory does not grow. Worth it only for many rows N: see
`_MERGED_MIN_ROWS` in `tuners/lora_layers.py`, where the layer picks this path.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

_scratch = threading.local()


def _scratch_like(w: torch.Tensor) -> torch.Tensor:
    """A reusable (o, i) buffer for W_eff, one per (shape, dtype, device) and thread. W_eff lives only for the
    one GEMM that consumes it, so reusing a buffer replaces two large allocate/free pairs per layer and step
    (which fragmented the heap: +820 MiB peak RSS at 8x512 on SmolLM2 with fresh tensors) by a few MB kept."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (tuple(w.shape), w.dtype, w.device)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    return buf


def _effective_weight(
    w: torch.Tensor, ABs: tuple[torch.Tensor, ...], scalings: tuple[float, ...]
) -> torch.Tensor:
    """W + sum_k s_k * B_k @ A_k: (o, i), written into a scratch buffer that the caller must consume before
    the next call (one GEMM). ABs alternate A_k (r_k, i), B_k (o, r_k)."""
    w_eff = torch.addmm(w, ABs[1], ABs[0], alpha=scalings[0], out=_scratch_like(w))
    for k in range(1, len(scalings)):
        w_eff.addmm_(ABs[2 * k + 1], ABs[2 * k], alpha=scalings[k])
    return w_eff


def effective_weight(
    w: torch.Tensor, adapters: list[tuple[torch.Tensor, torch.Tensor, float]], in_major: bool = False
) -> torch.Tensor:
    """W + sum_k s_k * B_k @ A_k as a new (o, i) tensor (w: (o, i), possibly a transposed view; adapters:
    (A (r, i), B (o, r), scaling)). The same sum `merged_lora_linear` forms in a scratch buffer.
    in_major: the result is the (o, i) view of a contiguous (i, o) tensor, W^T + sum_k s_k A_k^T B_k^T."""
    if in_major:
        return effective_weight(w.T, [(B.T, A.T, s) for A, B, s in adapters]).T
    (A, B, s), *rest = adapters
    w_eff = torch.addmm(w, B, A, alpha=s)
    for A, B, s in rest:
        w_eff.addmm_(B, A, alpha=s)
    return w_eff


class _MergedLoraLinear(torch.autograd.Function):
    """forward(x (..., i), w (o, i), bias (o,) or None, scalings, A_1, B_1, A_2, B_2, ...) -> (..., o).

    w may be a transposed view (GPT-2 Conv1D); it receives no gradient (the caller checks it is frozen)."""

    @staticmethod
    def forward(ctx, x, w, bias, scalings, *ABs):  # noqa: ANN001, ANN205
        out = F.linear(x, _effective_weight(w, ABs, scalings), bias)
        ctx.save_for_backward(x, w, *ABs)
        ctx.scalings = scalings
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, w, *ABs = ctx.saved_tensors
        s = ctx.scalings
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, o), (N, i)
        grad_x = (g2 @ _effective_weight(w, ABs, s)).view(x.shape) if need_x else None
        grad_bias = g2.sum(0) if need_bias else None
        grad_ABs: list[torch.Tensor | None] = []
        for k in range(len(s)):
            A, B = ABs[2 * k], ABs[2 * k + 1]
            need_A, need_B = ctx.needs_input_grad[4 + 2 * k : 6 + 2 * k]
            grad_B = (g2.T @ (x2 @ A.T)).mul_(s[k]) if need_B else None  # (o, r)
            grad_A = (g2 @ B).mul_(s[k]).T @ x2 if need_A else None  # (r, i)
            grad_ABs += [grad_A, grad_B]
        return grad_x, None, grad_bias, None, *grad_ABs


def merged_lora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """`F.linear(x, w, bias) + sum_k s_k * x @ A_k.T @ B_k.T`, computed as one GEMM with W + sum_k s_k B_k A_k.

    Args:
        x: (..., i). w: (o, i), frozen (no grad flows to it). bias: (o,) or None.
        adapters: (A (r, i), B (o, r), scaling) per active adapter, all in x's dtype.
    Returns:
        (..., o).
    """
    ABs = tuple(t for A, B, _ in adapters for t in (A, B))
    return _MergedLoraLinear.apply(x, w, bias, tuple(s for *_, s in adapters), *ABs)
