"""Held-out loss and exact match in one pass: each prompt runs through the model once for both.

`evaluate.eval_loss` runs prompt + response (teacher forced) and `evaluate.exact_match` runs the prompt again
to generate from it; the prompt is ~80% of a row's tokens, so that is most of the evaluation twice. Here each
batch of rows is laid out as [shared opening | pads | own prompt | response | pads] (the opening every prompt
shares runs once with batch 1, as in `evaluate.generate_batch`); one forward gives the response-token loss from
the logits of the last prompt token on, and its KV cache, cut back to the prompt, is where greedy generation
continues, exactly as `generate_batch` would from its own prefill (positions from the attention mask, pads
masked). Same rows, same metrics as the two separate calls (up to fp32 summation order), same early stop
(`match_stop`), same report samples (the first `n_samples` rows, run to the end in a batch of their own).

Not for prompt-learning adapters (they prepend virtual tokens): `held_out` then makes the two separate calls.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from peftkit.hf_compat import CACHE_KEY
from peftkit.shared_prefix import prefix_cache
from peftkit.train.data import Example, encode_prompt, tokenize
from peftkit.train.evaluate import (
    _adds_virtual_tokens,
    _shared_prompt_length,
    eval_chunks,
    eval_loss,
    exact_match,
    generate_batch,
    greedy_texts,
    loss_summary,
    score,
)


@torch.no_grad()
def held_out(
    model,
    tokenizer,
    examples: list[Example],
    max_length: int,
    max_new_tokens: int,
    batch_size: int = 32,
    progress=None,
    n_samples: int = 5,
) -> tuple[dict, dict]:
    """``(loss, exact_match)`` of ``model`` on ``examples``, as ``evaluate.eval_loss`` and
    ``evaluate.exact_match`` return them (the loss over the rows ``tokenize`` keeps at ``max_length``)."""
    items = [tokenize(tokenizer, e, max_length) for e in examples]
    if _adds_virtual_tokens(model):
        loss = eval_loss(model, [t for t in items if t is not None], tokenizer.pad_token_id)
        em = exact_match(
            model, tokenizer, examples, max_new_tokens, batch_size, progress, n_samples=n_samples
        )
        return loss, em
    responses = [t.input_ids[t.prompt_len :] if t is not None else [] for t in items]
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    shown = list(range(min(n_samples, len(examples))))
    outputs: dict[int, str] = {}
    total, count = 0.0, 0
    for chunk in eval_chunks(prompts, shown, batch_size):
        refs = [None if i in shown else examples[i].response for i in chunk]
        texts, loss_sum, n = _batch(
            model, tokenizer, [prompts[i] for i in chunk], [responses[i] for i in chunk], refs, max_new_tokens
        )
        outputs.update((i, t.strip()) for i, t in zip(chunk, texts))
        total, count = total + loss_sum, count + n
        if progress is not None:
            progress.update(len(chunk))
    model.train(was_training)
    return loss_summary(total, count), score(examples, outputs, n_samples)


def _plain_cache(cache) -> bool:
    """True if ``cache`` is made of plain full-length layers only (each can be cut back to a length)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _batch(model, tokenizer, prompts, responses, refs, max_new_tokens):
    """One batch: (generated texts, summed response-token loss, number of response tokens)."""
    pad_id = tokenizer.pad_token_id
    shared = _shared_prompt_length(model, prompts)
    cache = prefix_cache(model, torch.tensor([prompts[0][:shared]]), len(prompts)) if shared else None
    if cache is None:
        shared = 0
    width = max(len(p) for p in prompts) - shared  # own prompt columns, left padded
    tail = max(len(r) for r in responses)  # response columns, right padded
    ids, mask = [], []
    for p, r in zip(prompts, responses):
        left, right = width + shared - len(p), tail - len(r)
        ids.append(p[:shared] + [pad_id] * left + p[shared:] + r + [pad_id] * right)
        mask.append([1] * shared + [0] * left + [1] * (len(p) - shared + len(r)) + [0] * right)
    ids, mask = torch.tensor(ids), torch.tensor(mask)  # [batch, shared + width + tail]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(
        input_ids=ids[:, shared:],
        attention_mask=mask,
        position_ids=positions[:, shared:],
        use_cache=True,
        logits_to_keep=tail + 1,
        **({CACHE_KEY: cache} if cache is not None else {}),
    )
    # logits [batch, tail + 1, vocab]: column j (from the last prompt token on) predicts response token j
    logits, targets = out.logits[:, :tail].float(), ids[:, shared + width :]
    valid = mask[:, shared + width :].bool()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    loss_sum, n = float(nll[valid].sum()), int(valid.sum())
    cache = getattr(out, CACHE_KEY, None)
    if not _plain_cache(cache):  # e.g. sliding-window layers: cannot be cut back; generate from the prompt
        return generate_batch(model, tokenizer, prompts, max_new_tokens, refs), loss_sum, n
    cache.crop(-(tail + 1))  # keep the prompt but its last token, which generate runs to start decoding
    prompt_ids, prompt_mask = ids[:, : shared + width], mask[:, : shared + width]
    texts = greedy_texts(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, refs, cache)
    return texts, loss_sum, n
