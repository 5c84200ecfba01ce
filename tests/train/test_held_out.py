"""The one-pass held-out evaluation (loss and exact match sharing the prompt's forward) equals the two
separate calls: same loss (fp32 summation order aside), same answers, same score, same samples."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftkit
from peftkit.hf_compat import CACHE_KEY
from peftkit.train import evaluate as ev
from peftkit.train.data import Example, encode_prompt, tokenize_all
from peftkit.train.held_out import held_out
from tests.train.tiny import WORDS


@pytest.mark.parametrize("wrap", [None, "lora", "prompt_tuning", "uncuttable_cache"])
def test_one_pass_equals_separate_loss_and_exact_match(tiny_chat_model, wrap, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    if wrap == "lora":
        config = peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = peftkit.get_peft_model(model, config).eval()
    elif wrap == "prompt_tuning":
        model = peftkit.get_peft_model(model, peftkit.PromptTuningConfig(num_virtual_tokens=3))
    elif wrap == "uncuttable_cache":  # as with sliding-window layers: each batch generates from its prompt
        from peftkit.train import held_out as module

        monkeypatch.setattr(module, "plain_layers", lambda cache: False)
    opening = {"role": "system", "content": "Reverse the word. " * 3}
    users = [" ".join(WORDS[i % 8 : i % 8 + 1 + i // 8]) for i in range(10)]
    blank = [Example(messages=(opening, {"role": "user", "content": u}), response="") for u in users]
    answers = [ev.generate_batch(model, tok, [encode_prompt(tok, e)], 5)[0].strip() for e in blank]
    # hits, misses at the first character and at the end, responses of different lengths
    refs = [
        a if i % 3 == 0 else "\u00a7" + a if i % 3 == 1 else a + " " + WORDS[i % 8]
        for i, a in enumerate(answers)
    ]
    rows = [Example(messages=e.messages, response=r) for e, r in zip(blank, refs)]
    max_length = max(len(encode_prompt(tok, e)) for e in rows)  # the longest row keeps no response token
    items = tokenize_all(tok, rows, max_length, "held-out")
    assert 0 < len(items) < len(rows)

    mode = model.training
    head_inputs = []  # whether each batched head call got a contiguous input (head_input: one GEMM, not bmm)
    hook = model.get_output_embeddings().register_forward_hook(  # sees the input after pre-hooks
        lambda m, args, out: head_inputs.append(args[0].is_contiguous()) if args[0].shape[0] > 1 else None
    )
    body = (model.get_base_model() if wrap in ("lora", "prompt_tuning") else model).model
    calls = []  # (rows, tokens) of each decoder call on input_ids that starts from no cache

    def fresh_starts(module, args, kwargs):
        if kwargs.get(CACHE_KEY) is None and kwargs.get("input_ids") is not None:
            calls.append(tuple(kwargs["input_ids"].shape))

    start = body.register_forward_pre_hook(fresh_starts, with_kwargs=True)
    loss, em = held_out(model, tok, rows, max_length, max_new_tokens=5, batch_size=4, n_samples=3)
    hook.remove()
    start.remove()
    assert head_inputs and all(head_inputs)
    if wrap != "prompt_tuning":  # the shared opening ran once, batch 1, for all 4 batches (3 + the samples)
        shared = ev._shared_prompt_length(model, [encode_prompt(tok, e) for e in rows])
        assert shared >= 8 and calls == [(1, shared)]
    if wrap == "lora":  # the pass ran every LoRA layer folded (inference_fold), built once for all batches
        from peftkit.inference_fold import is_folded
        from peftkit.tuners.lora_layers import LoraLinear

        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        assert layers and all(is_folded(m) for m in layers)
    want_loss = ev.eval_loss(model, items, tok.pad_token_id)
    want_em = ev.exact_match(model, tok, rows, 5, batch_size=4, n_samples=3)
    assert loss["tokens"] == want_loss["tokens"]
    assert loss["loss"] == pytest.approx(want_loss["loss"], rel=1e-5)
    assert (em["correct"], em["total"]) == (want_em["correct"], want_em["total"]) == (4, 10)
    assert em["samples"] == want_em["samples"] and [s["got"] for s in em["samples"]] == answers[:3]
    assert model.training == mode


def test_known_greedy_reads_the_greedy_answer_off_the_teacher_forced_columns():
    from peftkit.train.held_out import TIE_MARGIN, known_greedy

    eos, sure = 9, [1.0] * 6
    response = [4, 5, 6, eos, 7]
    # every column predicts the reference through end of turn: the whole answer, complete
    assert known_greedy([4, 5, 6, eos, 7], sure, response, 8, eos) == ([4, 5, 6, eos], True)
    # column 1 picks another token: greedy emits it, then columns 2.. no longer apply
    assert known_greedy([4, 3, 6, eos, 7], sure, response, 8, eos) == ([4, 3], False)
    # ... unless that token ends the turn (or the budget): then the answer is complete, a miss
    assert known_greedy([4, eos, 6, eos, 7], sure, response, 8, eos) == ([4, eos], True)
    assert known_greedy([4, 5, 6, eos, 7], sure, response, 2, eos) == ([4, 5], True)
    # a near tie proves nothing at that column
    assert known_greedy([4, 5, 6, eos], [1.0, TIE_MARGIN / 2, 1.0, 1.0], response, 8, eos) == ([4], False)
    # a reference without an end-of-turn token: what follows it is unknown
    assert known_greedy([4, 5, 6], sure, [4, 5, 6], 8, eos) == ([4, 5, 6], False)


def test_answers_settled_by_the_forward_are_not_generated_and_score_the_same(tiny_chat_model, monkeypatch):
    """A model that answers with end of turn (the tiny model memorizes its rows first): its hits and its
    provable misses come from the one forward, only the undecided rows run decode steps, and the score, the
    samples and the loss equal the separate calls'."""
    import torch

    from peftkit.train import held_out as module
    from peftkit.train.data import collate, tokenize

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    opening = {"role": "system", "content": "Reverse the word. " * 3}
    taught = [Example(messages=(opening, {"role": "user", "content": w}), response=w[::-1]) for w in WORDS]
    items = [tokenize(tok, e, 64) for e in taught]
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**collate(items, tok.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    answers = [ev.generate_batch(model, tok, [encode_prompt(tok, e)], 8)[0].strip() for e in taught]
    assert answers == [w[::-1] for w in WORDS]  # memorized, each answer ended by end of turn
    # hits; misses at the first character (settled by the forward); a reference the answer is the start of
    # (undecided: the model's end of turn comes where the reference goes on, a miss the forward settles too)
    refs = [a if i % 3 == 0 else "\u00a7" + a if i % 3 == 1 else a + "x" for i, a in enumerate(answers)]
    rows = [Example(messages=e.messages, response=r) for e, r in zip(taught, refs)]
    generated = []
    real = module.greedy_texts

    def counting(model, tokenizer, ids, *args, **kwargs):
        generated.append(ids.shape[0])
        return real(model, tokenizer, ids, *args, **kwargs)

    monkeypatch.setattr(module, "greedy_texts", counting)
    loss, em = held_out(model, tok, rows, 64, max_new_tokens=8, batch_size=4, n_samples=2)
    # read off the forward: every hit (the first sample's too) and every miss but the second sample, which
    # runs to its end so that the report shows what the model answered
    assert generated == [1]
    want_loss = ev.eval_loss(model, tokenize_all(tok, rows, 64, "held-out"), tok.pad_token_id)
    want_em = ev.exact_match(model, tok, rows, 8, batch_size=4, n_samples=2)
    assert loss["loss"] == pytest.approx(want_loss["loss"], rel=1e-5)
    assert (em["correct"], em["total"]) == (want_em["correct"], want_em["total"]) == (3, 8)
    assert em["samples"] == want_em["samples"]
