"""Shared-prefix training: run the opening every row of a batch has in common once, not once per row.

Instruction data repeats the same start in every example: the chat template's system prompt, the task's
fixed instruction, the Alpaca header. In a causal model those positions' hidden states depend only on the
tokens before them, so for a batch whose rows agree on their first P tokens the decoder computes the same
thing B times. Here the prefix runs once: when the whole batch packs into at most `PACK_MAX` tokens, as one
sequence [prefix | row 0's suffix | row 1's suffix | ...] with a mask that lets each suffix see the prefix
and its own earlier tokens at their original positions (`packed_layout`: one decoder call, whose attention
computes only those blocks on the CPU: `packed_attention`); otherwise with
batch 1, its keys and values broadcast to the B rows as a KV cache (a view, no copies), and the rows run
only their own suffix on top of it. Either way autograd sums the rows' gradients into the one prefix, which
is what the B identical copies would have received, so the loss and every gradient equal the plain
computation (up to fp32 summation order).

It applies inside the fused causal-LM loss path (`fused_loss.try_fused_forward`) when
- the rows share at least `MIN_PREFIX` tokens, all attended (attention_mask 1) and all unlabelled: the
  label at position P (predicted from position P-1, inside the prefix) must be -100 too;
- nothing in the model is random while training (every `nn.Dropout` has p=0 and no attention/hidden dropout
  in the config): with dropout the B copies would draw different masks, which one shared pass cannot;
- the caller passed input_ids (no inputs_embeds, position_ids or cache of its own), the body does not use
  gradient checkpointing, and the model's cache holds plain full-length layers (no sliding window).
Right padding keeps the prefix intact (`peftkit train` pads right); left padding simply finds no prefix.

Switch off: `peftkit.set_shared_prefix(False)` for every model, or `model.shared_prefix = False`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .hf_compat import CACHE_KEY
from .packed_attention import segments

IGNORE_INDEX = -100
MIN_PREFIX = 8
_CALLER_STATE = ("inputs_embeds", "position_ids", "cache", "past_key_values", "cache_position")
_enabled = True


def set_shared_prefix(enabled: bool) -> None:
    """Switch shared-prefix training on (default) or off for every model."""
    global _enabled
    _enabled = bool(enabled)


def common_prefix_length(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> int:
    """The largest P such that every row has the same input_ids[:, :P], attention_mask is 1 there and
    labels[:, :P+1] are all -100. input_ids, attention_mask, labels: (batch, seq). Returns 0..seq-2."""
    same = (input_ids == input_ids[:1]).all(0)  # (seq,)
    if attention_mask is not None:
        same &= (attention_mask != 0).all(0)
    prefix = int(same.int().argmin()) if not bool(same.all()) else same.numel()
    labelled = (labels != IGNORE_INDEX).any(0)  # (seq,)
    if not bool(labelled.any()):
        return 0
    return max(0, min(prefix, int(labelled.int().argmax()) - 1))


def _is_stochastic(body: nn.Module) -> bool:
    """True if a training forward of `body` draws random numbers: a dropout module with p > 0, or a
    dropout probability in its config (attention dropout is a float there, not a module)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in body.modules()):
        return True
    if not body.training:  # attention dropout applies in training only
        return False
    config = vars(getattr(body, "config", None) or object())
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0 for k, v in config.items())


def prefix_length(model: nn.Module, body: nn.Module, kwargs: dict[str, Any], labels: torch.Tensor) -> int:
    """How many leading tokens the fused forward of `body` may run once for the whole batch (0: none).

    model: the PeftModel (its switch); body: the decoder (e.g. LlamaModel); kwargs: the body's inputs."""
    if not (_enabled and getattr(model, "shared_prefix", True)):
        return 0
    ids = kwargs.get("input_ids")
    if (
        ids is None
        or ids.dim() != 2
        or ids.shape[0] < 2
        or any(kwargs.get(k) is not None for k in _CALLER_STATE)
    ):
        return 0
    mask = kwargs.get("attention_mask")
    if getattr(body, "gradient_checkpointing", False) or labels.shape != ids.shape:
        return 0
    if mask is not None and mask.shape != ids.shape:  # a 4-D mask of the caller's own: leave it alone
        return 0
    p = common_prefix_length(ids, kwargs.get("attention_mask"), labels)
    if p < MIN_PREFIX or _is_stochastic(body):
        return 0
    return p


def plain_layers(cache: Any) -> bool:
    """True if `cache` is made of plain full-length layers only (no sliding window): each one can be
    broadcast to more rows, cut back to a length and row-selected."""
    layers = getattr(cache, "layers", None)
    return isinstance(layers, list) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def prefix_cache(module: nn.Module, prefix_ids: torch.Tensor, rows: int) -> Any:
    """Run `module` (a decoder body or a causal LM) once on prefix_ids (1, P) and return its KV cache
    broadcast to `rows` rows, or None if the cache is not made of plain full-length layers."""
    return Opening(module, prefix_ids).cache_for(rows)


class Opening:
    """The KV cache of an opening (1, P) run once through `module`, handed out as a fresh cache per batch.

    Evaluation runs many batches after one opening (the chat template, the system prompt, the task's fixed
    instruction): each batch gets its own cache object whose layers start as views of the one stored
    (1, kv_heads, P, head_dim) keys/values broadcast to its rows. A batch's forward replaces its layers'
    tensors (the cache grows by concatenation, is cut back and row-selected into new tensors), never writes
    into them, so the stored opening stays as it was for the next batch."""

    def __init__(self, module: nn.Module, prefix_ids: torch.Tensor):
        self.length = prefix_ids.shape[1]
        cache = getattr(module(input_ids=prefix_ids, use_cache=True), CACHE_KEY, None)
        # decided once: only plain full-length layers can be broadcast (a sliding window cannot)
        full = plain_layers(cache) and all(layer.keys is not None for layer in cache.layers)
        self._cache = cache if full else None

    def cache_for(self, rows: int) -> Any:
        """A cache holding the opening for `rows` rows: every layer's (1, kv_heads, P, head_dim) keys and
        values expanded to (rows, kv_heads, P, head_dim) as views. None if the model's cache is not made of
        plain full-length layers (the caller then runs the whole prompts)."""
        if self._cache is None:
            return None
        cache = copy.copy(self._cache)  # a new cache object and layer objects; the tensors are not copied
        cache.layers = [copy.copy(layer) for layer in self._cache.layers]
        for layer in cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        return cache


def packed_layout(keep: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each row's suffix tokens go in one packed sequence [prefix | row 0's | row 1's | ...].

    keep: (batch, seq - prefix) bool, the suffix tokens attended to (attention_mask 1). Returns
    rows, cols: (n,) the batch row and suffix column of each packed token after the prefix, in order;
    allowed: (prefix + n, prefix + n) bool, True where query i may attend to key j: the prefix causally,
    and each row's own tokens causally by their original position, as the rows see them unpacked."""
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's tokens together, in column order
    pos = torch.cat([torch.arange(prefix), cols + prefix])  # (L,) original positions
    seg = torch.cat([torch.full((prefix,), -1), rows])  # (L,) -1: the shared prefix
    same = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])
    return rows, cols, same & (pos[None, :] <= pos[:, None])


# Up to this packed length one pass over [prefix | every row's suffix] beats the prefix pass + the batched
# suffix pass (one decoder call instead of two: the ~70 ops per layer and their backward run once). Its
# attention computes only the blocks the mask lets through (`packed_attention`), so it grows with the rows, not
# their square. Measured forward + backward per step on SmolLM2-135M LoRA all-linear with the bundled data
# (66-token prefix, ~39-token suffixes), packed / two passes, 2 threads, same batches alternating
# (benchmarks-style A/B, 2026-11-30): 8 rows (L ~380) 0.92; 12 (~490) 0.86; 16 (~740) 0.84; 24 (~1100) 0.90;
# 32 (~1220) 1.05. (With SDPA over the whole (L, L) mask it was 1.02 at 12 rows and 1.22 at 24, and the limit
# was 512.)
PACK_MAX = 1024
_PACKABLE_ATTENTION = ("sdpa", "peftkit_sdpa")  # implementations that read a 4-D bool mask as "may attend"


def feeds_a_label(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: True where a position's hidden state can reach the loss, i.e. some later position of
    its row is labelled (position t predicts label t + 1, and under causal attention nothing earlier reads a
    later position). A row's last token, and whatever follows its last label, feeds nothing."""
    labelled = (labels != IGNORE_INDEX).int()
    return (labelled.flip(1).cumsum(1).flip(1) - labelled) > 0


def _run_packed(
    body: nn.Module, kwargs: dict[str, Any], prefix: int, labels: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The suffix hidden states (batch, seq - prefix, hidden) from one packed pass, zeros at pads and, given
    `labels` (batch, seq), at the tokens that feed no label (`feeds_a_label`: left out of the pass); None when
    packing does not apply (too long, another attention implementation, a sliding window)."""
    ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    config = getattr(body, "config", None)
    keep = (mask[:, prefix:] != 0) if mask is not None else torch.ones_like(ids[:, prefix:], dtype=torch.bool)
    if labels is not None:  # e.g. each row's final token: ~2% of the default run's packed tokens
        keep = keep & feeds_a_label(labels)[:, prefix:].to(keep.device)
    length = prefix + int(keep.sum())
    if (
        config is None
        or getattr(config, "_attn_implementation", None) not in _PACKABLE_ATTENTION
        or getattr(config, "sliding_window", None)
        or length > PACK_MAX
    ):
        return None
    rows, cols, allowed = packed_layout(keep.cpu(), prefix)
    rows, cols = rows.to(ids.device), cols.to(ids.device)
    packed_ids = torch.cat([ids[0, :prefix], ids[:, prefix:][rows, cols]])[None]  # (1, L)
    positions = torch.cat([torch.arange(prefix, device=ids.device), cols + prefix])[None]
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache")}
    with segments(body, rows, prefix):  # the attention computes only the blocks the mask lets through
        out = body(
            input_ids=packed_ids,
            attention_mask=allowed.to(ids.device)[None, None],
            position_ids=positions,
            use_cache=False,
            **rest,
        )
    hidden = out.last_hidden_state[0, prefix:]  # (n, hidden)
    shape = (ids.shape[0], ids.shape[1] - prefix, hidden.shape[-1])
    return hidden.new_zeros(shape).index_put((rows, cols), hidden)


def run_with_shared_prefix(
    body: nn.Module, kwargs: dict[str, Any], prefix: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, slice] | None:
    """Run `body` on input_ids[:1, :prefix] once and on every row's suffix: packed into one sequence with the
    prefix (`_run_packed`) when short enough, else on the batched suffix with the prefix's KV cache.

    Returns (hidden states of the suffix (batch, seq - prefix, hidden), the slice of positions they cover),
    or None if the model's cache cannot be shared (the caller runs the plain forward). Given `labels` (batch,
    seq), the packed pass leaves out the tokens that feed no label; their hidden states come back as zeros."""
    packed = _run_packed(body, kwargs, prefix, labels)
    if packed is not None:
        return packed, slice(prefix, None)
    ids = kwargs["input_ids"]
    cache = prefix_cache(body, ids[:1, :prefix], ids.shape[0])
    if cache is None:
        return None
    rest = {k: v for k, v in kwargs.items() if k != "use_cache"}
    rest["input_ids"] = ids[:, prefix:]
    out = body(**rest, **{CACHE_KEY: cache}, use_cache=True)
    return out.last_hidden_state, slice(prefix, None)
