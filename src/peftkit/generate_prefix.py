"""Batched `generate` with the prompts' common opening run once (the shared-prefix KV cache).

Chat prompts in a batch all start with the same tokens: the chat template, the system prompt, often a fixed
instruction (66 of the ~105 tokens of the bundled date questions). Left-padded, those tokens sit at different
offsets, so `generate`'s prefill computes them once per row. Here, for a batch of left-padded prompts whose
real tokens share their first P tokens (P >= `shared_prefix.MIN_PREFIX`, every row keeping at least one own
token), the prefix runs once with batch 1, its KV cache is broadcast to the rows as a view, and `generate`
continues from the rearranged rows [prefix | pads | own rest] with the pads masked. Positions come from the
attention mask, so every real token keeps the position it has under plain left padding, and the new tokens
equal those of the plain call (up to fp32 summation order; greedy tokens identical in
tests/perf/test_generate_prefix.py). The returned sequences are the caller's own input_ids followed by the new
tokens, as from the plain call.

Only the plain case is taken: keyword `input_ids` (batch >= 2, left padding or no padding), no cache,
embeddings or positions of the caller's, one beam and one sequence per prompt, a tensor result (no
`return_dict_in_generate`), no streamer or assistant, a model whose cache is made of plain full-length layers,
no prompt-learning adapter. Anything else, or `peftkit.set_shared_prefix(False)` / `model.shared_prefix =
False` (as mixed-adapter calls set), runs the plain `generate`.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kv_cache, shared_prefix
from .generate_settings import prompt_learning, settings
from .hf_compat import CACHE_KEY

_REFUSED = (
    "past_key_values",
    "cache",
    "inputs_embeds",
    "position_ids",
    "cache_position",
    "streamer",
    "assistant_model",
    "prompt_lookup_num_tokens",
    "cache_implementation",
    "logits_processor",
    "prefix_allowed_tokens_fn",
)
_ONE = ("num_beams", "num_return_sequences", "num_beam_groups")
_FALSE = (
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
)


def common_length(rows: list[torch.Tensor]) -> int:
    """How many leading tokens all 1-D `rows` share, each keeping at least one token of its own."""
    limit = min(len(r) for r in rows) - 1
    if limit <= 0:
        return 0
    head = torch.stack([r[:limit] for r in rows])  # (batch, limit)
    same = (head == head[:1]).all(0)
    return limit if bool(same.all()) else int(same.int().argmin())


def _eligible(model: Any, kwargs: dict[str, Any]) -> bool:
    if not (shared_prefix._enabled and getattr(model, "shared_prefix", True)):
        return False
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 2:
        return False
    if any(kwargs.get(k) is not None for k in _REFUSED) or kwargs.get("use_cache") is False:
        return False
    if prompt_learning(model):
        return False
    setting = settings(model, kwargs)
    return (
        all((setting(k, 1) or 1) == 1 for k in _ONE)
        and not any(setting(k, False) for k in _FALSE)
        and setting("cache_implementation", None) is None
        and setting("use_cache", True) is not False
    )


def _left_padded_rows(ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor] | None:
    """Each row's real tokens, or None unless the mask is 0/1 with every row's pads on the left only."""
    if mask is None:
        return list(ids)
    if mask.shape != ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
        return None
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):  # a 1 before a 0: right or inner padding
        return None
    lengths = mask.sum(1).tolist()
    if min(lengths) == 0:
        return None
    return [row[ids.shape[1] - n :] for row, n in zip(ids, lengths)]


@torch.no_grad()
def generate_with_shared_prefix(model: Any, generate: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """`generate(**kwargs)` with the shared prefix run once (see module doc), or None when it does not apply.

    model: the PeftModel; generate: the plain generate to call (the tuner's); kwargs: the caller's keywords,
    input_ids (batch, width) and optionally attention_mask (batch, width). Returns (batch, width + new)."""
    if not _eligible(model, kwargs):
        return None
    ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    rows = _left_padded_rows(ids, mask)
    if rows is None:
        return None
    shared = common_length(rows)
    if shared < shared_prefix.MIN_PREFIX:
        return None
    cache = shared_prefix.prefix_cache(
        model.get_base_model(), ids[:1, ids.shape[1] - len(rows[0]) :][:, :shared], len(rows)
    )
    if cache is None:
        return None
    width = ids.shape[1]
    pad = ids[0, 0] if mask is not None else 0
    new_ids = ids.new_full((len(rows), width), int(pad))
    new_mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # [shared | pads | own rest]
        rest = len(row) - shared
        new_ids[i, :shared], new_ids[i, width - rest :] = row[:shared], row[shared:]
        new_mask[i, :shared], new_mask[i, width - rest :] = 1, 1
    call = {
        **kwargs,
        "input_ids": new_ids,
        "attention_mask": new_mask,
        CACHE_KEY: kv_cache.make_growing(cache),
    }
    out = generate(**call)
    return torch.cat([ids, out[:, width:]], dim=1)
