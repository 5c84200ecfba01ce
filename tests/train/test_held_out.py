"""The one-pass held-out evaluation (loss and exact match sharing the prompt's forward) equals the two
separate calls: same loss (fp32 summation order aside), same answers, same score, same samples."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftkit
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

        monkeypatch.setattr(module, "_plain_cache", lambda cache: False)
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
    loss, em = held_out(model, tok, rows, max_length, max_new_tokens=5, batch_size=4, n_samples=3)
    want_loss = ev.eval_loss(model, items, tok.pad_token_id)
    want_em = ev.exact_match(model, tok, rows, 5, batch_size=4, n_samples=3)
    assert loss["tokens"] == want_loss["tokens"]
    assert loss["loss"] == pytest.approx(want_loss["loss"], rel=1e-5)
    assert (em["correct"], em["total"]) == (want_em["correct"], want_em["total"]) == (4, 10)
    assert em["samples"] == want_em["samples"] and [s["got"] for s in em["samples"]] == answers[:3]
    assert model.training == mode
