"""Held-out loss and exact match in one pass: each prompt runs through the model once for both.

`evaluate.eval_loss` runs prompt + response (teacher forced) and `evaluate.exact_match` runs the prompt again
to generate from it; the prompt is ~80% of a row's tokens, so that is most of the evaluation twice. Here each
batch of rows is laid out as [shared opening | pads | own prompt | response | pads] (the opening every prompt
shares runs once with batch 1 for all the batches, `shared_prefix.Opening`); one forward gives the
response-token loss from the logits of the last prompt token on, and its KV cache, cut back to the prompt, is
where greedy generation continues, exactly as `generate_batch` would from its own prefill (positions from the
attention mask, pads masked). Same rows, same metrics as the two separate calls (up to fp32 summation order),
same early stop (`match_stop`), same report samples (the first `n_samples` rows, run to the end in a batch of
their own).

Most rows need no generation at all (`known_greedy`): greedy decoding picks the argmax at each step, and as long
as it picks the reference token, its next step sees exactly the input of the teacher-forced column that follows.
So the forward already gives each row's greedy tokens up to the first one that differs from the reference: a
trained model's hit (the whole reference and its end-of-turn token) is known without a decode step, and so is
the base model's miss ("The date ..." cannot strip to a date). Only the other rows are generated, from the cut
cache as above.

Not for prompt-learning adapters (they prepend virtual tokens): `held_out` then makes the two separate calls.
"""

from __future__ import annotations

import torch

from peftkit.head_input import contiguous_head_input
from peftkit.hf_compat import CACHE_KEY
from peftkit.inference_fold import generating
from peftkit.shared_prefix import Opening, plain_layers
from peftkit.train.data import Example, encode_prompt, tokenize
from peftkit.train.evaluate import (
    _adds_virtual_tokens,
    eval_chunks,
    eval_loss,
    exact_match,
    generate_batch,
    greedy_texts,
    left_padded,
    loss_summary,
    opening_of,
    score,
)
from peftkit.train.match_stop import can_still_match


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
    # The weights cannot change during this pass: LoRA Linear layers run folded into one scratch weight each,
    # built once for every batch (inference_fold), and the head takes its sliced input as one GEMM (head_input).
    with generating(), contiguous_head_input(model):
        # the opening every prompt shares (chat template, system prompt, instruction) runs once for all batches
        opening = opening_of(model, prompts)
        for chunk in eval_chunks(prompts, shown, batch_size):
            refs = [None if i in shown else examples[i].response for i in chunk]
            texts, loss_sum, n = _batch(
                model,
                tokenizer,
                [prompts[i] for i in chunk],
                [responses[i] for i in chunk],
                refs,
                max_new_tokens,
                opening,
            )
            outputs.update((i, t.strip()) for i, t in zip(chunk, texts))
            total, count = total + loss_sum, count + n
            if progress is not None:
                progress.update(len(chunk))
    model.train(was_training)
    return loss_summary(total, count), score(examples, outputs, n_samples)


def _batch(model, tokenizer, prompts, responses, refs, max_new_tokens, opening: Opening | None):
    """One batch: (generated texts, summed response-token loss, number of response tokens). ``opening``: the
    KV cache of the tokens every prompt starts with (None: each prompt runs whole)."""
    pad_id = tokenizer.pad_token_id
    cache = opening.cache_for(len(prompts)) if opening is not None else None
    shared = opening.length if cache is not None else 0
    prompt_ids, prompt_mask = left_padded(prompts, shared, pad_id)  # [batch, shared + width]
    width = prompt_ids.shape[1] - shared  # own prompt columns, left padded
    tail = max(len(r) for r in responses)  # response columns, right padded
    response_ids = torch.tensor([r + [pad_id] * (tail - len(r)) for r in responses], dtype=prompt_ids.dtype)
    response_mask = torch.tensor(
        [[1] * len(r) + [0] * (tail - len(r)) for r in responses], dtype=prompt_mask.dtype
    )
    ids = torch.cat([prompt_ids, response_ids], 1)  # [batch, shared + width + tail]
    mask = torch.cat([prompt_mask, response_mask], 1)
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
    # cross entropy along the contiguous vocab dim (on logits.transpose(1, 2) it runs ~5x slower on CPU)
    nll = logits.logsumexp(-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [batch, tail]
    loss_sum, n = float(nll[valid].sum()), int(valid.sum())
    texts = _known_texts(model, tokenizer, logits, responses, refs, max_new_tokens)
    need = [b for b, text in enumerate(texts) if text is None]  # rows whose answer needs decode steps
    if not need:
        return texts, loss_sum, n
    cache = getattr(out, CACHE_KEY, None)
    if not plain_layers(cache):  # e.g. sliding-window layers: cannot be cut back; generate from the prompt
        generated = generate_batch(  # from the one opening already run, if it can be broadcast
            model, tokenizer, [prompts[b] for b in need], max_new_tokens, _pick(refs, need), opening
        )
    else:
        cache.crop(-(tail + 1))  # keep the prompt but its last token, which generate runs to start decoding
        rows = torch.tensor(need)
        if len(need) < len(prompts):
            cache.batch_select_indices(rows)
        prompt_ids, prompt_mask = ids[rows, : shared + width], mask[rows, : shared + width]
        generated = greedy_texts(
            model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, _pick(refs, need), cache
        )
    for b, text in zip(need, generated):
        texts[b] = text
    return texts, loss_sum, n


def _pick(refs, rows):
    return [refs[b] for b in rows]


# A teacher-forced column proves the greedy token only when its top logit beats the second by this much: the
# fp32 rounding between the batched forward and step-by-step decoding is orders of magnitude smaller.
TIE_MARGIN = 1e-3

# generation_config fields under which greedy generate() is plain argmax decoding (do_sample=False is passed,
# so sampling settings do nothing); any other field (repetition_penalty, num_beams, min_new_tokens,
# suppress_tokens, ...) may change the chosen tokens, and every row is then generated.
_ARGMAX_SAFE = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "max_length",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "transformers_version",
    "_from_model_config",
}


def _greedy_is_argmax(model) -> bool:
    """True if ``greedy_texts`` on ``model`` picks the argmax of the logits at every step."""
    config = getattr(model, "generation_config", None)
    return config is not None and set(config.to_diff_dict()) <= _ARGMAX_SAFE


def known_greedy(
    pred: list[int], margin: list[float], response: list[int], max_new_tokens: int, eos_id: int | None
) -> tuple[list[int], bool]:
    """The first greedy tokens that a teacher-forced pass proves, and whether they are the whole answer.

    pred, margin: per response column j (predicting ``response[j]`` from prompt + ``response[:j]``), the argmax
    token and its lead over the runner-up. Greedy decoding picks ``response[j]`` at step j exactly when
    ``pred[j]`` is it, and then sees the input of column j + 1; so it emits ``response[:j] + [pred[j]]`` where j
    is the first column that differs (or is a near tie: then only ``response[:j]`` is known). The answer is
    complete at the end-of-turn token or after ``max_new_tokens`` tokens, as generate stops there."""
    tokens: list[int] = []
    for j in range(min(len(response), max_new_tokens)):
        if margin[j] < TIE_MARGIN:
            return tokens, False
        tokens.append(pred[j])
        if pred[j] == eos_id:
            return tokens, True
        if pred[j] != response[j]:
            break
    return tokens, len(tokens) >= max_new_tokens


def _known_texts(model, tokenizer, logits, responses, refs, max_new_tokens) -> list[str | None]:
    """Per row, the answer text when the teacher-forced ``logits`` [batch, tail, vocab] settle it (a complete
    greedy answer, or a row with a reference whose known start can no longer match it, cut short there as
    ``match_stop`` cuts it); None for the rows that need decode steps."""
    if not _greedy_is_argmax(model):
        return [None] * len(responses)
    top = logits.topk(2, dim=-1)  # values, indices: [batch, tail, 2]
    preds, margins = top.indices[..., 0].tolist(), (top.values[..., 0] - top.values[..., 1]).tolist()
    texts: list[str | None] = []
    for pred, margin, response, ref in zip(preds, margins, responses, refs):
        tokens, complete = known_greedy(pred, margin, response, max_new_tokens, tokenizer.eos_token_id)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        settled = complete or (ref is not None and not can_still_match(text, ref))
        texts.append(text if settled else None)
    return texts
