"""Batch-1 greedy `generate` with prompt-lookup candidates: several tokens per weight read, the same tokens.

One prompt decoded greedily on a CPU is bound by reading the weights: every new token streams the whole
model (540 MB for SmolLM2-135M in fp32) for a handful of flops. Answers very often repeat stretches of the
prompt or of themselves (an extracted date, a quoted name, code, a repeated sentence), so transformers'
prompt-lookup decoding proposes the `NUM_TOKENS` tokens that followed the last matching n-gram of the text so
far and the model checks them all in one forward: every accepted candidate is a token for which the weights
were not read again. The check keeps exactly the tokens greedy decoding picks (a candidate is kept only if it
is the argmax after the tokens before it), so the output is greedy's (up to fp32 summation order: a forward
over k tokens sums in another order than k forwards over one; greedy tokens identical on the bundled held-out
prompts, tests/perf/test_prompt_lookup.py). When candidates are rejected the step cost a little more than a
plain one (4 tokens checked instead of 1, still bound by the same weight read).

`offer(model, args, kwargs)` adds `prompt_lookup_num_tokens=NUM_TOKENS` to a `PeftModel.generate` call when
it is the plain case: keyword `input_ids` of one row, greedy (no sampling, one beam, one sequence), a
decoder-only model, no assistant, streamer, cache or embeddings of the caller's, a tensor result (no
`return_dict_in_generate`), no prompt-learning adapter. Switch off: `peftkit.set_prompt_lookup(False)`, or
pass `prompt_lookup_num_tokens` yourself.
"""

from __future__ import annotations

from typing import Any

import torch

from .generate_settings import prompt_learning, settings

NUM_TOKENS = 4
_enabled = True

_CALLERS_OWN = (
    "assistant_model",
    "prompt_lookup_num_tokens",
    "streamer",
    "past_key_values",
    "cache",
    "inputs_embeds",
    "cache_implementation",
)


def set_prompt_lookup(enabled: bool) -> None:
    """Switch prompt-lookup decoding for batch-1 greedy `PeftModel.generate` on (default) or off."""
    global _enabled
    _enabled = bool(enabled)


def offer(model: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with prompt lookup switched on when the call is the plain batch-1 greedy case (module doc)."""
    ids = kwargs.get("input_ids")
    if not _enabled or args or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        return kwargs
    if any(kwargs.get(k) is not None for k in _CALLERS_OWN):
        return kwargs
    if prompt_learning(model):
        return kwargs
    if getattr(getattr(model.get_base_model(), "config", None), "is_encoder_decoder", False):
        return kwargs
    setting = settings(model, kwargs)
    plain = (
        not setting("do_sample", False)
        and (setting("num_beams", 1) or 1) == 1
        and (setting("num_return_sequences", 1) or 1) == 1
        and not setting("return_dict_in_generate", False)
        and setting("use_cache", True) is not False
        and setting("prompt_lookup_num_tokens", None) is None
        and setting("assistant_model", None) is None
        and setting("cache_implementation", None) is None
    )
    return {**kwargs, "prompt_lookup_num_tokens": NUM_TOKENS} if plain else kwargs
