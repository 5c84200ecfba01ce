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


def test_can_still_match_is_false_only_when_no_continuation_can_match():
    from peftkit.train.match_stop import can_still_match

    ref = " 2021-05-03\n"
    for possible in ["", " ", "\n2", "2021-0", "2021-05-03", "2021-05-03 \n", "2021-05-0\ufffd"]:
        assert can_still_match(possible, ref), possible
    for miss in ["The", "2021-05-04", "2021-05-033", "2021-05-03 ok", "x\ufffd2"]:
        assert not can_still_match(miss, ref), miss
    # tokenizer clean-up only deletes spaces: "a ." may later decode as "a." -> still possible
    assert can_still_match("Hello world .", "Hello world. Bye")


def test_early_stopped_exact_match_equals_full_generation(tiny_chat_model):
    """Rows built to hit, miss at the first character, miss at the last one, and miss by being too short or
    too long: the early-stopping score and every hit's answer equal those of generating every row to the
    end, the shown samples are full answers, and the rows that miss early really stop (fewer forwards)."""
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    prompts = [({"role": "user", "content": " ".join(WORDS[i % 8 : i % 8 + 1 + i // 8])},) for i in range(12)]
    blank = [Example(messages=m, response="") for m in prompts]
    full = ev.exact_match(model, tok, blank, max_new_tokens=6, early_stop=False)
    answers = [ev.generate_batch(model, tok, [encode_prompt(tok, e)], 6)[0].strip() for e in blank]
    assert all(len("".join(a.split())) >= 2 for a in answers), answers
    assert [s["got"] for s in full["samples"]] == answers[:5]
    refs = []
    for i, a in enumerate(answers):
        kind = i % 4
        refs.append(
            a if kind == 0 else "\u00a7" + a if kind == 1 else a[:-1] + "\u00a7" if kind == 2 else a[:1]
        )
    refs[3] = answers[3] + "more"  # too short an answer for the reference: a miss only at the end
    rows = [Example(messages=e.messages, response=r) for e, r in zip(blank, refs)]

    full = ev.exact_match(model, tok, rows, max_new_tokens=6, early_stop=False)
    early = ev.exact_match(model, tok, rows, max_new_tokens=6)
    assert (early["correct"], early["total"]) == (full["correct"], full["total"]) == (3, 12)
    assert early["samples"] == full["samples"] and [s["got"] for s in early["samples"]] == answers[:5]

    # all rows miss at their first visible character: they stop there, not after max_new_tokens forwards
    misses = [Example(messages=e.messages, response="\u00a7") for e in blank]
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    assert ev.exact_match(model, tok, misses, max_new_tokens=6, n_samples=0)["correct"] == 0
    n_early, calls[:] = len(calls), []
    assert ev.exact_match(model, tok, misses, max_new_tokens=6, early_stop=False)["correct"] == 0
    hook.remove()
    assert n_early < len(calls), (n_early, len(calls))
