"""Held-out metrics: response-only loss / perplexity, and exact match of greedy generations."""

from __future__ import annotations

import math

import torch
from transformers import StoppingCriteriaList

from peftkit.fused_loss import loss_only
from peftkit.hf_compat import CACHE_KEY
from peftkit.shared_prefix import MIN_PREFIX, Opening
from peftkit.train.data import IGNORE_INDEX, Example, Tokenized, collate, encode_prompt
from peftkit.train.match_stop import StopOnMismatch


def count_targets(labels: torch.Tensor) -> int:
    """Number of predicted (response) tokens in ``labels`` ``[batch, seq]``: positions 1.. not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def eval_loss(model, items: list[Tokenized], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Mean response-token loss and perplexity over ``items`` (model left in its previous mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start : start + batch_size]], pad_id)
        n = count_targets(batch["labels"])
        loss_sum = loss_only(model, batch, num_items_in_batch=1)  # 1: the summed loss; no full logits
        if loss_sum is None:  # not a model the fused path supports: the plain forward
            loss_sum = model(**batch, num_items_in_batch=1).loss
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return loss_summary(total, count)


def loss_summary(total: float, count: int) -> dict[str, float]:
    """{loss, perplexity, tokens} from the summed loss over `count` response tokens."""
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    references: list[str | None] | None = None,
    opening: Opening | None = None,
) -> list[str]:
    """Greedy continuations of tokenized prompts: batched, with the KV cache.

    The opening all prompts share (chat template, system prompt, fixed instruction) is run once and its KV
    cache broadcast to the rows; each row is then [shared | pads | own rest] with the pads masked, so
    positions (from the attention mask) and results are those of plain left padding. ``opening``: one
    already run for a larger set of prompts these start with (``opening_of``); None: found for these.
    With ``references`` (one per prompt; None = run to the end), a row stops as soon as it provably cannot
    equal its reference (``match_stop``): its text is then cut short, and is a miss either way."""
    opening = opening if opening is not None else opening_of(model, prompts)
    cache = opening.cache_for(len(prompts)) if opening is not None else None
    ids, mask = left_padded(prompts, opening.length if cache is not None else 0, tokenizer.pad_token_id)
    return greedy_texts(model, tokenizer, ids, mask, max_new_tokens, references, cache)


def opening_of(model, prompts: list[list[int]]) -> Opening | None:
    """The opening every prompt starts with, run once through ``model`` (``shared_prefix.Opening``), or None
    when there is none worth sharing (``_shared_prompt_length``)."""
    shared = _shared_prompt_length(model, prompts)
    return Opening(model, torch.tensor([prompts[0][:shared]])) if shared else None


def left_padded(prompts: list[list[int]], shared: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, attention mask (batch, width) of ``prompts`` laid out [first ``shared`` tokens | pads | own rest]:
    the opening they all share stays in front (its cache is the rows' first columns) and the pads after it
    are masked, so positions from the mask equal those of plain left padding."""
    width = max(len(p) for p in prompts) - shared
    ids = [p[:shared] + [pad_id] * (width + shared - len(p)) + p[shared:] for p in prompts]
    mask = [[1] * shared + [0] * (width + shared - len(p)) + [1] * (len(p) - shared) for p in prompts]
    return torch.tensor(ids), torch.tensor(mask)


def greedy_texts(model, tokenizer, ids, mask, max_new_tokens: int, references=None, cache=None) -> list[str]:
    """The decoded greedy continuations of left-padded rows ids / mask (batch, width), stopping at end of turn
    and, with ``references`` (one per row, None = run to the end), once a row provably misses its reference
    (``match_stop``). ``cache``: a KV cache already holding all but the last column of ids."""
    extra = {CACHE_KEY: cache} if cache is not None else {}
    if references is not None and any(r is not None for r in references):
        extra["stopping_criteria"] = StoppingCriteriaList(
            [StopOnMismatch(tokenizer, references, ids.shape[1])]
        )
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )  # [batch, width + new]
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def _shared_prompt_length(model, prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with (each keeps at least one of its own), or 0 when not worth sharing or
    when the adapter itself prepends to the input (prompt learning)."""
    if len(prompts) < 2 or _adds_virtual_tokens(model):
        return 0
    limit, first = min(len(p) for p in prompts) - 1, prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= MIN_PREFIX else 0


def _adds_virtual_tokens(model) -> bool:
    """True if the model's active adapter is a prompt-learning one (its generate prepends virtual tokens)."""
    config = getattr(model, "active_peft_config", None)  # HF peft's PeftModel
    if config is None:
        configs, name = getattr(model, "peft_config", None), getattr(model, "active_adapter", None)
        config = configs.get(name) if isinstance(configs, dict) and isinstance(name, str) else None
    return bool(getattr(config, "is_prompt_learning", False))


def exact_match(
    model,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int = 32,
    progress=None,
    early_stop: bool = True,
    n_samples: int = 5,
) -> dict:
    """Fraction of examples whose stripped greedy output equals the stripped reference response.

    The first ``n_samples`` rows (shown in the report as what the model answered) run in a batch of their
    own to the end; with ``early_stop`` every other row stops once it provably misses (``match_stop``), which
    gives the same score as generating every row to the end."""
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    shown = list(range(min(n_samples, len(examples)))) if early_stop else []
    outputs: dict[int, str] = {}
    opening = opening_of(model, prompts)  # run once for every batch
    for chunk in eval_chunks(prompts, shown, batch_size):
        refs = [None if i in shown else examples[i].response for i in chunk] if early_stop else None
        texts = generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, refs, opening)
        outputs.update((i, text.strip()) for i, text in zip(chunk, texts))
        if progress is not None:
            progress.update(len(chunk))
    model.train(was_training)
    return score(examples, outputs, n_samples)


def eval_chunks(prompts: list[list[int]], shown: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in evaluation batches: the `shown` rows (the report's samples, run to the end) in a batch of
    their own, then every other row sorted by prompt length (little padding) in batches of `batch_size`."""
    rest = sorted((i for i in range(len(prompts)) if i not in shown), key=lambda i: len(prompts[i]))
    return ([shown] if shown else []) + [rest[s : s + batch_size] for s in range(0, len(rest), batch_size)]


def score(examples: list[Example], outputs: dict[int, str], n_samples: int) -> dict:
    """Exact match of the stripped outputs (row index -> text) against the stripped references, with the first
    `n_samples` rows as samples of what the model answered."""
    hits = sum(outputs[i] == e.response.strip() for i, e in enumerate(examples))
    samples = [{"expected": e.response, "got": outputs[i]} for i, e in enumerate(examples[:n_samples])]
    return {"exact_match": hits / len(examples), "correct": hits, "total": len(examples), "samples": samples}


def default_max_new_tokens(tokenizer, examples: list[Example]) -> int:
    """Enough tokens for the longest reference answer plus a margin (and the end-of-turn token)."""
    longest = max(len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in examples)
    return min(longest + 4, 512)
