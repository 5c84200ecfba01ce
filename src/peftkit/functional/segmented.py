"""Rows of one batch through different adapters: group the rows, run each group once, put rows back.

A batch of B rows comes with one adapter per row. Rows are grouped by adapter (an index tensor per group),
so each adapter does work proportional to its own rows, never to the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def row_groups(names: Sequence[str], rows: int) -> list[tuple[str, torch.Tensor]]:
    """[(name, row indices (n_g,) int64)] for `rows` rows labelled by `names` (one per row, or one per
    group of `rows // len(names)` consecutive rows: `generate` repeats each prompt for beams/samples)."""
    if rows % len(names):
        raise ValueError(
            f"adapter_names has {len(names)} entries but the batch has {rows} rows; give one name per row"
        )
    per = rows // len(names)
    order: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        order.setdefault(name, []).extend(range(i * per, (i + 1) * per))
    return [(name, torch.tensor(idx, dtype=torch.long)) for name, idx in order.items()]


def grouped_apply(
    x: torch.Tensor,
    groups: list[tuple[str, torch.Tensor]],
    fn: Callable[[str, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Concatenate `fn(name, x[idx])` over the groups and restore row order.

    x: (B, ...). fn maps (n_g, ...) to (n_g, ...'). Returns (B, ...'); differentiable.
    """
    if len(groups) == 1:
        return fn(groups[0][0], x)
    parts, perm = [], []
    for name, idx in groups:
        idx = idx.to(x.device)
        parts.append(fn(name, x.index_select(0, idx)))
        perm.append(idx)
    inverse = torch.argsort(torch.cat(perm))
    return torch.cat(parts, dim=0).index_select(0, inverse)


def segmented_lora(
    result: torch.Tensor,
    x: torch.Tensor,
    segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, Callable]],
) -> torch.Tensor:
    """Add each segment's LoRA update to its rows of `result`.

    result: (B, ..., out), the frozen layer's output. x: (B, ..., in).
    segments: (row indices (n_g,), A (r_g, in), B (out, r_g), scaling, dropout) per adapter; ranks may differ.
    Returns (B, ..., out) = result + scaling_g * dropout(x[rows_g]) @ A_g.T @ B_g.T on each group's rows
    (`result` itself, updated in place, unless it requires grad).
    """
    for idx, A, B, scaling, dropout in segments:
        idx = idx.to(x.device)
        xa = dropout(x.index_select(0, idx).to(A.dtype))
        update = (xa @ A.T * scaling) @ B.T  # (n_g, ..., out)
        if result.requires_grad:
            result = result.index_add(0, idx, update.to(result.dtype))
        else:
            result.index_add_(0, idx, update.to(result.dtype))
    return result


def padded_groups(groups: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(table (n_groups, widest) of row indices, each group's rows then row 0 as padding; valid (n, widest)
    0/1 marking real entries, or None when every group has the same size and nothing is padded)."""
    widest = max(len(idx) for _, idx in groups)
    table = torch.zeros((len(groups), widest), dtype=torch.long)
    valid = torch.zeros((len(groups), widest))
    for g, (_, idx) in enumerate(groups):
        table[g, : len(idx)] = idx
        valid[g, : len(idx)] = 1
    return table, (None if bool(valid.all()) else valid)


def batched_lora_(
    result: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    valid: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: torch.Tensor,
) -> torch.Tensor:
    """Add every group's LoRA update to its rows of `result`, in place, with one gather and two batched matmuls.

    result: (rows, ..., out). x: (rows, ..., in). table, valid: from `padded_groups` (n groups, widest).
    A: (n, r_max, in) and B: (n, out, r_max), ranks zero-padded to r_max. scaling: (n,).
    Padding entries gather row 0 and are zeroed after the first matmul, so they add nothing.
    """
    n, widest = table.shape
    inner = x.shape[1:-1]
    flat = table.reshape(-1).to(x.device)
    xg = x.index_select(0, flat).reshape(n, -1, x.shape[-1])  # (n, widest*T, in)
    h = torch.bmm(xg.to(A.dtype), A.transpose(1, 2))  # (n, widest*T, r_max)
    weight = scaling.view(n, 1) if valid is None else valid.to(h) * scaling.view(n, 1)  # (n, 1|widest)
    h = (h.view(n, widest, -1, h.shape[-1]) * weight.view(n, -1, 1, 1)).view(n, -1, h.shape[-1])
    update = torch.bmm(h, B.transpose(1, 2))  # (n, widest*T, out)
    return result.index_add_(0, flat, update.reshape(n * widest, *inner, -1).to(result.dtype))


def blocked_lora_(result: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """Add every group's LoRA update to `result` in place when group g holds rows [g*m, (g+1)*m): no gather.

    result: (rows, ..., out), contiguous. x: (rows, ..., in). At: (g, in, r) = A transposed, Bt: (g, r, out) =
    (scaling * B) transposed, both contiguous (a transposed view as the right operand makes the batched GEMM
    several times slower on the CPU). Two batched matmuls on views:
    result.view(g, m*T, out) += (x.view(g, m*T, in) @ At) @ Bt.
    """
    g = At.shape[0]
    h = torch.bmm(x.reshape(g, -1, x.shape[-1]).to(At.dtype), At)  # (g, m*T, r)
    if result.dtype == Bt.dtype:
        result.view(g, -1, result.shape[-1]).baddbmm_(h, Bt)
    else:
        result.view(g, -1, result.shape[-1]).add_(torch.bmm(h, Bt).to(result.dtype))
    return result


def blocked_linear_lora(
    x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, At: torch.Tensor, Bt: torch.Tensor
) -> torch.Tensor:
    """A frozen Linear plus every group's LoRA update when group g holds rows [g*m, (g+1)*m).

    x: (rows, ..., in). wt: (in, out), the Linear's weight transposed (a contiguous copy multiplies faster on
    the CPU than the transposed view). bias: (out,) or None. At: (g, in, r), Bt: (g, r, out) as in
    `blocked_lora_`. Returns (rows, ..., out) = x @ wt + bias + (x.view(g, m*T, in) @ At) @ Bt.
    """
    return blocked_lora_(_frozen_linear(x, wt, bias), x, At, Bt)


def gathered_linear_lora(
    x: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: torch.Tensor,
    table: torch.Tensor,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """A frozen Linear plus each group's LoRA update for rows grouped in any order (`batched_lora_`).

    x: (rows, ..., in). wt: (in, out), as in `blocked_linear_lora`. bias: (out,) or None. A, B, scaling, table,
    valid: as in `batched_lora_`. Returns (rows, ..., out).
    """
    return batched_lora_(_frozen_linear(x, wt, bias), x, table, valid, A, B, scaling)


def _frozen_linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (rows, ..., in) @ wt (in, out) + bias: (rows, ..., out), one GEMM on the flattened rows."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch.mm(flat, wt) if bias is None else torch.addmm(bias, flat, wt)
    return y.view(*x.shape[:-1], -1)
