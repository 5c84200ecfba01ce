"""Attention for a packed shared-prefix batch that computes only the blocks its mask lets through.

`shared_prefix._run_packed` runs a batch as one sequence [prefix | row 0's suffix | row 1's suffix | ...]
of L tokens with an (L, L) mask: the prefix attends causally to itself, each suffix token to the whole
prefix and causally to its own row. SDPA with that mask computes all L x L scores, and most are masked: with
the bundled data (a 66-token prefix, 8 suffixes of ~39 tokens, L ~ 380) about one in five is used. Here the
same attention runs in two parts:

- the prefix's queries against the prefix's keys, causal SDPA: (1, H, P, D);
- every row's suffix queries, padded to the longest suffix S, against [the prefix's keys | the row's own
  suffix keys]: (B, H, S, D) x (B, KV, P + S, D), causal inside the suffix, padded keys hidden; as plain
  matmuls and a softmax, the query heads grouped under their key/value head.

Measured on one SmolLM2-135M layer (H=9, KV=3, D=64; P=66, 8 suffixes of 30-45 tokens, L=362; 2 threads),
forward + backward: 7.0-9.1 ms against 10.8-12.9 ms for SDPA with the packed mask (flash kernel); the
segmented SDPA (flash kernel on the padded suffixes) was no faster (13.5 ms): its per-block overhead dominates
at these sizes. CPU fp32 only (what was measured); other devices and dtypes keep SDPA with the packed mask.

The outputs are put back in packed order, so the result equals SDPA with the packed mask up to fp32 summation
order (each query sees exactly the same keys), and so do the gradients, which flow back through the gathers.

Used only while `segments(body, rows, prefix)` is active, for the layers' attention calls whose query length
is the layout's L; anything else (another length, dropout, an extra kwarg such as a sliding window or softcap) runs
transformers' `sdpa_attention_forward` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_functions import Call, register, unusual
from .hf_compat import config_tree

NAME = "peftkit_packed"
_SWITCHED_FROM = ("sdpa", "peftkit_sdpa")


@dataclass(frozen=True)
class Segments:
    """Where each row's suffix sits in the packed sequence.

    prefix: P, the shared prefix's length; length: L = P + n, the packed length;
    index: (B, S) long, packed position of row b's s-th suffix token (pads point at position P);
    bias: (B, 1, 1, S, P + S) float, 0 where a padded suffix query may attend to a key, -inf elsewhere
      ([the prefix | its own row's earlier tokens]; a pad's query sees the prefix, so no row is all -inf);
    order: (n,) long, the flat (B * S) slot of each packed suffix token, in packed order."""

    prefix: int
    length: int
    index: torch.Tensor
    bias: torch.Tensor
    order: torch.Tensor


def segments_of(rows: torch.Tensor, prefix: int) -> Segments:
    """The layout of a packed sequence whose suffix tokens belong to batch rows ``rows`` (n,), row-major and in
    column order within a row (as `shared_prefix.packed_layout` packs them)."""
    n = rows.numel()
    batch = int(rows.max()) + 1 if n else 0
    counts = torch.bincount(rows, minlength=batch)  # (B,)
    starts = torch.cumsum(counts, 0) - counts  # (B,) first packed suffix slot of each row
    rank = torch.arange(n, device=rows.device) - starts[rows]  # (n,) a token's place within its row
    width = int(counts.max()) if n else 0
    order = rows * width + rank  # (n,)
    index = torch.full((batch * width,), prefix, dtype=torch.long, device=rows.device)
    index[order] = prefix + torch.arange(n, device=rows.device)
    valid = torch.zeros(batch * width, dtype=torch.bool, device=rows.device)
    valid[order] = True
    valid = valid.view(batch, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=rows.device).tril_()
    own = causal[None] & valid[:, None, :]  # (B, S, S): earlier tokens of the same row, no pads
    seen = torch.cat([torch.ones(batch, width, prefix, dtype=torch.bool, device=rows.device), own], dim=2)
    bias = torch.zeros(seen.shape, device=rows.device).masked_fill_(~seen, float("-inf"))
    return Segments(prefix, prefix + n, index.view(batch, width), bias[:, None, None], order)


_active: Segments | None = None


def _applies(c: Call) -> bool:
    s = _active
    return (
        s is not None
        and c.is_causal is not False
        and c.query.device.type == "cpu"
        and c.query.dtype == torch.float32
        and c.dropout == 0.0
        and c.query.shape[0] == 1
        and s.length > s.prefix
        and c.query.shape[2] == s.length
        and c.key.shape[2] == s.length
        and c.query.shape[1] % c.key.shape[1] == 0
        and not unusual(c.kwargs)
    )


def _heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * groups, T, D), each key/value head repeated for its query heads."""
    if groups == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)


def _segmented(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """query (1, H, L, D), key / value (1, KV, L, D) of the active packed layout -> (1, L, H, D)."""
    s = _active
    p, (b, width) = s.prefix, s.index.shape
    h, kv, d = query.shape[1], key.shape[1], query.shape[-1]
    groups = h // kv
    head = F.scaled_dot_product_attention(
        query[:, :, :p],
        _heads(key[:, :, :p], groups),
        _heads(value[:, :, :p], groups),
        is_causal=True,
        scale=scale,
    )  # (1, H, P, D)
    flat = s.index.view(-1)

    def rows_of(x: torch.Tensor) -> torch.Tensor:  # (1, X, L, D) -> (B, X, S, D), each row's suffix, padded
        return x[0].index_select(1, flat).view(x.shape[1], b, width, -1).transpose(0, 1)

    def with_prefix(x: torch.Tensor) -> torch.Tensor:  # (1, KV, L, D) -> (B, KV, P + S, D)
        return torch.cat([x[:, :, :p].expand(b, -1, -1, -1), rows_of(x)], dim=2)

    # A query head's group shares its key/value head: (B, KV, groups * S, D) against (B, KV, P + S, D), so
    # the keys and values are not repeated (nor their gradients summed back). Plain matmuls: at these sizes
    # (S ~ 40) they are faster here than the fused SDPA kernels, whose per-block overhead dominates.
    grouped = rows_of(query).reshape(b, kv, groups * width, d)
    scores = torch.matmul(grouped, with_prefix(key).transpose(-1, -2)).view(b, kv, groups, width, p + width)
    scores = scores * scale + s.bias  # (B, KV, groups, S, P + S)
    weights = torch.softmax(scores, dim=-1)
    tail = torch.matmul(weights.view(b, kv, groups * width, p + width), with_prefix(value))  # (B, KV, g*S, D)
    tail = tail.view(b, h, width, d).transpose(1, 2).reshape(b * width, h, d).index_select(0, s.order)
    return torch.cat([head[0].transpose(0, 1), tail])[None]


packed_attention_forward = register(NAME, _applies, _segmented)


@contextmanager
def segments(body: nn.Module, rows: torch.Tensor, prefix: int) -> Iterator[None]:
    """Within: `body`'s sdpa config uses the packed attention for calls of the packed length, when the packed
    sequence's suffix tokens belong to batch rows ``rows`` (n,) after a ``prefix``-token prefix (on the CPU;
    elsewhere nothing changes)."""
    global _active
    if rows.device.type != "cpu":
        yield
        return
    # The body's own config (and its sub-configs): the one its attention layers read. Walking every module for
    # configs took ~12 ms per training step on SmolLM2 (~2,500 modules); a layer holding a config of its own
    # keeps sdpa with the packed mask, which is as exact, only slower.
    switched = [
        (c, c._attn_implementation_internal)
        for c in config_tree([body.config])
        if getattr(c, "_attn_implementation_internal", None) in _SWITCHED_FROM
    ]
    previous, _active = _active, segments_of(rows, prefix)
    for config, _ in switched:
        config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        _active = previous
        for config, name in switched:
            config._attn_implementation_internal = name
