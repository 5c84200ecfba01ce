"""Held-out evaluation: batched greedy generation with the shared prompt opening run once equals plain
left-padded generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftkit
from peftkit.shared_prefix import prefix_cache
from peftkit.train import evaluate as ev
from peftkit.train.data import Example, encode_prompt
from tests.train.tiny import WORDS


@pytest.mark.parametrize("wrap", [None, "lora", "prompt_tuning"])
def test_generation_with_shared_opening_equals_left_padding(tiny_chat_model, wrap, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    if wrap == "lora":
        config = peftkit.LoraConfig(
            r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        model = peftkit.get_peft_model(model, config).eval()
    elif wrap == "prompt_tuning":
        model = peftkit.get_peft_model(
            model, peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
        )
    # different lengths after a long common opening (the instruction)
    opening = {"role": "system", "content": "Reverse the word. " * 4}
    rows = [
        Example(messages=(opening, {"role": "user", "content": " ".join(WORDS[: i + 1])}), response="x")
        for i in range(4)
    ]
    prompts = [encode_prompt(tok, e) for e in rows]
    shared = ev._shared_prompt_length(model, prompts)
    assert (shared >= ev.MIN_PREFIX) == (wrap != "prompt_tuning")
    if shared:  # the opening's cache is really built and broadcast (no silent fallback)
        cache = prefix_cache(model, torch.tensor([prompts[0][:shared]]), len(prompts))
        assert cache is not None and cache.layers[0].keys.shape[0] == len(prompts)
    fast = ev.generate_batch(model, tok, prompts, max_new_tokens=6)
    monkeypatch.setattr(ev, "_shared_prompt_length", lambda m, p: 0)
    plain = ev.generate_batch(model, tok, prompts, max_new_tokens=6)
    assert fast == plain and any(fast)


def test_exact_match_counts_the_rows_whose_greedy_answer_is_the_reference(tiny_chat_model):
    """References set to the model's own greedy answers for rows 0 and 2 (of different prompt lengths, so the
    length sort reorders them) and to something else for the rest: exactly those two count."""
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    rows = [
        Example(messages=({"role": "user", "content": " ".join(WORDS[: 5 - i])},), response="")
        for i in range(4)
    ]
    answers = [ev.generate_batch(model, tok, [encode_prompt(tok, e)], 4)[0].strip() for e in rows]
    assert any(answers), "the tiny model must say something for the check to mean anything"
    refs = [answers[0], "never said", f"  {answers[2]} ", answers[3] + " and more"]
    rows = [Example(messages=e.messages, response=r) for e, r in zip(rows, refs)]
    result = ev.exact_match(model, tok, rows, max_new_tokens=4, batch_size=3)
    assert (result["correct"], result["total"]) == (2, 4) and result["exact_match"] == 0.5
    assert [s["got"] for s in result["samples"]] == answers
