"""The LoRA branch of a Linear layer, added into the base output in place, saving only what backward needs;
with a frozen base, the base GEMM and the branch as one autograd node (`lora_linear`).

Straightforward autograd for `out = base(x) + B(A(dropout(x)) * s)` allocates the branch output (N, out)
and a new sum (N, out), and with dropout keeps the dropped input (N, in) in fp32 for A's backward, one copy
per adapted layer (q, k and v each keep their own). `lora_branch_` instead

- accumulates `h @ B.T` into the base output with one `addmm_` (no (N, out) temporaries),
- saves x (already kept by the base linear, so no new memory), the dropout mask as bool (a quarter of the
  size) and the small h = s * A(dropout(x)) (N, r); backward recomputes dropout(x) from x and the mask.

The dropout mask is drawn exactly as `torch.nn.functional.dropout` draws it on CPU (a Bernoulli(1 - p) fill
of a tensor like x), so for the same RNG state the result equals the plain computation.
"""

from __future__ import annotations

import torch


def _dropped(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """dropout(x) for a given bool mask (x itself without one)."""
    return x if mask is None else x * mask * (1.0 / (1.0 - p))


class _LoraBranch(torch.autograd.Function):
    """forward(out (..., o) modified in place, x (..., i), A (r, i), B (o, r), scaling, p, mask like x or None)
    -> out. Shapes are flattened inside, so autograd sees no views."""

    @staticmethod
    def forward(ctx, out, x, A, B, scaling, p, mask):  # noqa: ANN001, ANN205
        h = _dropped(x, mask, p).reshape(-1, x.shape[-1]) @ A.T  # (N, r)
        h.mul_(scaling)
        out.view(-1, out.shape[-1]).addmm_(h, B.T)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, h, mask)
        ctx.scaling, ctx.p = scaling, p
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, A, B, h, mask = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        g2 = g.reshape(-1, g.shape[-1])  # (N, o)
        # (h.T @ g).T, not g.T @ h: the same product, 3-5x faster from MKL at N ~ 400 on SmolLM2's shapes
        # (e.g. 31 vs 179 us for down_proj's (576, 8))
        grad_B = (h.T @ g2).T if need_B else None  # (o, r)
        gh = (g2 @ B).mul_(ctx.scaling) if (need_x or need_A) else None  # (N, r)
        grad_A = gh.T @ _dropped(x, mask, ctx.p).reshape(-1, x.shape[-1]) if need_A else None  # (r, i)
        grad_x = _dropped((gh @ A).view(x.shape), mask, ctx.p) if need_x else None  # like x
        return g, grad_x, grad_A, grad_B, None, None, None


class _LoraLinear(torch.autograd.Function):
    """forward(x (..., i), w (o, i) frozen, bias (o,) or None, A (r, i), B (o, r), scaling, p, mask like x or
    None) -> (..., o): the frozen base GEMM and the LoRA branch as one autograd node. Backward adds the branch's
    input gradient into the base's (one (N, i) tensor; no second one for autograd to sum)."""

    @staticmethod
    def forward(ctx, x, w, bias, A, B, scaling, p, mask):  # noqa: ANN001, ANN205
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        out = x2 @ w.T if bias is None else torch.addmm(bias, x2, w.T)  # (N, o)
        h = _dropped(x, mask, p).reshape(x2.shape) @ A.T  # (N, r)
        h.mul_(scaling)
        out.addmm_(h, B.T)
        ctx.save_for_backward(x, w, A, B, h, mask)
        ctx.scaling, ctx.p = scaling, p
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, w, A, B, h, mask = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        g2 = g.reshape(-1, g.shape[-1])  # (N, o)
        grad_B = (h.T @ g2).T if need_B else None  # (o, r); this order: see _LoraBranch
        gh = (g2 @ B).mul_(ctx.scaling) if (need_x or need_A) else None  # (N, r)
        grad_A = gh.T @ _dropped(x, mask, ctx.p).reshape(-1, x.shape[-1]) if need_A else None  # (r, i)
        grad_x = None
        if need_x:
            grad_x = g2 @ w  # (N, i)
            if mask is None:
                grad_x.addmm_(gh, A)
            else:
                grad_x += _dropped(gh @ A, mask.reshape(grad_x.shape), ctx.p)
            grad_x = grad_x.view(x.shape)
        grad_bias = g2.sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


def lora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """`F.linear(x, w, bias) + scaling * dropout(x) @ A.T @ B.T` as one autograd node (`lora_branch_` adds the
    branch to a base output that autograd already tracks: two nodes, and two input gradients to sum).

    Args:
        x: (..., i). w: (o, i), frozen: it receives no gradient (possibly a transposed view, as GPT-2's Conv1D
            gives). bias: (o,) or None. A: (r, i). B: (o, r). p: dropout probability, applied if `training`.
    Returns:
        (..., o).
    """
    return _LoraLinear.apply(x, w, bias, A, B, scaling, p, dropout_mask(x, p, training))


def dropout_mask(x: torch.Tensor, p: float, training: bool) -> torch.Tensor | None:
    """The bool keep-mask `F.dropout(x, p, training)` would draw (same RNG use), or None if it is a no-op."""
    if p == 0.0 or not training:
        return None
    return torch.empty_like(x).bernoulli_(1.0 - p).bool()


def lora_branch_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """`out += scaling * dropout(x) @ A.T @ B.T`, in place (autograd-aware), returning `out`.

    Args:
        out: the base layer's output (..., o), contiguous; it must not be needed by its own backward (true of
            `nn.Linear` and `Conv1D`, whose backward keeps the input and weight only).
        x: the layer input (..., i). A: (r, i). B: (o, r). p: dropout probability, applied if `training`.
    """
    return _LoraBranch.apply(out, x, A, B, scaling, p, dropout_mask(x, p, training))
