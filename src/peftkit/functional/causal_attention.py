"""Exact causal attention computed one query block at a time, with causal skipping (CPU training).

For each block of queries [s, e) only the keys that block can see (positions <= S - T + e - 1) are
multiplied, and only the diagonal square needs a triangular mask; the rest of the causal triangle is
skipped. The G = H / KV query heads sharing a key/value head are stacked into the matmul's row dimension, so
GQA needs no `repeat_kv`. A block holds its whole softmax row at once, so the forward is a plain softmax
and saves only the inputs; the backward recomputes each block's probabilities and uses the softmax backward
p * (dp - rowsum(p * dp)) over whole rows.

Internal layout: queries as (B, KV, T, G, D), so a query block is a contiguous (B * KV, n * G, D) matrix
stack; keys and values as (B, KV, S, D). Low-precision inputs are computed in fp32 and cast back.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK = 32


def _scores(
    qs: torch.Tensor,
    k: torch.Tensor,
    s: int,
    e: int,
    offset: int,
    tri: torch.Tensor,
    hide: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Masked scaled scores of query block [s, e) against the keys it can see.

    qs: (B, KV, T, G, D) scaled queries; k: (B, KV, S, D); tri: (block, block) bool, True above the diagonal;
    hide: (B, 1, T, S) bool, True where the caller's mask hides a key, or None; out: scratch with at least
    B * KV * (e - s) * G * (offset + e) elements. Returns (B, KV, e - s, G, offset + e) fp32 with -inf
    where a key is hidden.
    """
    b, kv, _, g, d = qs.shape
    n, width = e - s, offset + e
    scores = out[: b * kv * n * g * width].view(b * kv, n * g, width)
    torch.bmm(
        qs[:, :, s:e].reshape(b * kv, n * g, d), k[:, :, :width].reshape(b * kv, width, d).mT, out=scores
    )
    scores = scores.view(b, kv, n, g, width)
    scores[..., offset + s :].masked_fill_(tri[:n, None, :n], float("-inf"))
    if hide is not None:
        scores.masked_fill_(hide[:, :, s:e, None, :width], float("-inf"))
    return scores


def _prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 working copies: scaled queries (B, KV, T, G, D) and contiguous keys / values (B, KV, S, D)."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    qs = torch.empty(b, kv, t, h // kv, d, dtype=torch.float32, device=q.device)
    torch.mul(q.view(b, kv, h // kv, t, d).transpose(2, 3), scale, out=qs)
    return qs, k.float().contiguous(), v.float().contiguous()


def _empty_rows(hide: torch.Tensor | None, offset: int) -> torch.Tensor | None:
    """(B, 1, T, 1, 1) bool: True for a query that sees no key (hidden by the mask or causality), or None."""
    if hide is None:
        return None
    t, s = hide.shape[-2:]
    future = torch.ones(t, s, dtype=torch.bool, device=hide.device).triu_(offset + 1)
    empty = (hide | future).all(-1)
    return empty[..., None, None] if bool(empty.any()) else None


def _hidden(mask: torch.Tensor | None, b: int, t: int, s: int) -> torch.Tensor | None:
    """The caller's boolean mask (broadcastable to (B, 1, T, S), True = attend) as (B, 1, T, S), True = hide."""
    if mask is None:
        return None
    return torch.logical_not(mask.expand(b, 1, t, s))


def _probabilities(
    qs: torch.Tensor,
    k: torch.Tensor,
    s: int,
    e: int,
    offset: int,
    tri: torch.Tensor,
    hide: torch.Tensor | None,
    empty: torch.Tensor | None,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Softmax probabilities of query block [s, e): (B, KV, e - s, G, offset + e) fp32.

    Each block holds its whole row, so forward and backward both take a plain softmax (no running max, no
    saved logsumexp). empty: (B, 1, T, 1, 1) bool, True for a query with no visible key, or None when there is
    none; those rows (NaN after a softmax over -inf) become 0.
    """
    p = torch.softmax(_scores(qs, k, s, e, offset, tri, hide, scratch), dim=-1)
    if empty is not None:
        p.masked_fill_(empty[:, :, s:e], 0.0)
    return p


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask, block):  # noqa: ANN001, ANN205
        b, h, t, d = q.shape
        kv, s_len = k.shape[1], k.shape[2]
        g, offset = h // kv, s_len - t
        qs, kf, vf = _prepare(q, k, v, scale)
        hide = _hidden(mask, b, t, s_len)
        empty = _empty_rows(hide, offset)
        tri = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)
        scratch = torch.empty(b * kv * min(block, t) * g * s_len, dtype=torch.float32, device=q.device)
        out = torch.empty(b, t, kv, g, d, dtype=torch.float32, device=q.device)  # = (B, T, H, D) memory
        for s in range(0, t, block):
            e = min(s + block, t)
            p = _probabilities(qs, kf, s, e, offset, tri, hide, empty, scratch)
            o = torch.bmm(
                p.view(b * kv, (e - s) * g, -1), vf[:, :, : offset + e].reshape(b * kv, offset + e, d)
            )
            out[:, s:e] = o.view(b, kv, e - s, g, d).transpose(1, 2)
        ctx.save_for_backward(qs, kf, vf, hide, empty)
        ctx.scale, ctx.block, ctx.dtypes = scale, block, (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype).view(b, t, h, d).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        qs, kf, vf, hide, empty = ctx.saved_tensors
        b, kv, t, g, d = qs.shape
        s_len, offset, block = kf.shape[2], kf.shape[2] - t, ctx.block
        do = torch.empty_like(qs)  # (B, KV, T, G, D)
        do.copy_(grad_out.view(b, kv, g, t, d).transpose(2, 3))
        tri = torch.ones(block, block, dtype=torch.bool, device=qs.device).triu_(1)
        scratch = torch.empty(2, b * kv * min(block, t) * g * s_len, dtype=torch.float32, device=qs.device)
        dq = torch.empty(b, t, kv, g, d, dtype=torch.float32, device=qs.device)  # = (B, T, H, D) memory
        dk = torch.zeros_like(kf).view(b * kv, s_len, d)
        dv = torch.zeros_like(vf).view(b * kv, s_len, d)
        for s in range(0, t, block):
            e = min(s + block, t)
            n, width = e - s, offset + e
            p3 = _probabilities(qs, kf, s, e, offset, tri, hide, empty, scratch[0]).view(b * kv, n * g, width)
            do3 = do[:, :, s:e].reshape(b * kv, n * g, d)
            dv[:, :width].baddbmm_(p3.mT, do3)
            dp = torch.bmm(
                do3, vf[:, :, :width].reshape(b * kv, width, d).mT, out=scratch[1, : p3.numel()].view_as(p3)
            )
            # softmax backward over whole rows: p * (dp - rowsum(p * dp)), rowsum(p * dp) = dO . O
            ds = torch._softmax_backward_data(dp, p3, -1, torch.float32)
            dk[:, :width].baddbmm_(ds.mT, qs[:, :, s:e].reshape(b * kv, n * g, d))
            dqb = torch.bmm(ds, kf[:, :, :width].reshape(b * kv, width, d))
            dq[:, s:e] = dqb.view(b, kv, n, g, d).transpose(1, 2)
        qt, kt, vt = ctx.dtypes
        dq = dq.mul_(ctx.scale).to(qt).view(b, t, kv * g, d).transpose(1, 2)
        return dq, dk.view(b, kv, s_len, d).to(kt), dv.view(b, kv, s_len, d).to(vt), None, None, None


def blocked_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Causal softmax attention, exact, for CPU training.

    q: (B, H, T, D); k, v: (B, KV, S, D) with S >= T and H a multiple of KV (GQA / MQA / MHA). The queries
    are the last T positions: query i sits at position S - T + i and attends keys j <= S - T + i.
    mask: optional bool, broadcastable to (B, 1, T, S), True = attend (as transformers passes to sdpa),
    applied on top of causality; a query row with no visible key gives 0 (and zero gradients), not NaN.
    scale: multiplies q @ k^T (usually D ** -0.5). block: queries per block.
    Returns (B, H, T, D) in q's dtype; fp16 / bf16 inputs are computed in fp32.
    """
    b, h, t, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[1] or k.shape[2] < t:
        raise ValueError(
            f"expected q (B, H, T, D) and k, v (B, KV, S >= T, D) with KV | H; got {q.shape}, "
            f"{k.shape}, {v.shape}"
        )
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}")
    return _BlockedCausalAttention.apply(q, k, v, float(scale), mask, int(block))
