"""Batch-1 greedy `PeftModel.generate` checks prompt-lookup candidates (several tokens per forward) and gives
the tokens of plain greedy decoding."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoraConfig, PromptTuningConfig, get_peft_model, kv_cache, prompt_lookup
from tests.models import tiny_llama


def _model():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(tiny_llama(), config).eval()


def _repetitive(seed=4, n=24):
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(1, 128, (6,), generator=g).tolist()
    return torch.tensor([(phrase * 5)[:n]])


def _count_forwards(model):
    calls = {"n": 0}
    body = model.get_base_model()
    handle = body.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls, handle


@pytest.mark.parametrize("seed", [4, 7, 9])
def test_lookup_gives_greedy_tokens_in_fewer_forwards(seed):
    model = _model()
    ids = _repetitive(seed)
    kw = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False, pad_token_id=0
    )
    outs, forwards = {}, {}
    for on in (False, True):
        peftkit.set_prompt_lookup(on)
        calls, handle = _count_forwards(model)
        try:
            with torch.no_grad():
                outs[on] = model.generate(**kw)
        finally:
            handle.remove()
            peftkit.set_prompt_lookup(True)
        forwards[on] = calls["n"]
    assert torch.equal(outs[True], outs[False])
    assert forwards[False] == outs[False].shape[1] - ids.shape[1]  # one forward per new token
    assert forwards[True] < forwards[False]  # candidates were accepted: several tokens per forward


def test_rejected_candidates_crop_the_growing_cache_without_copies(monkeypatch):
    model = _model()
    rebuilds = {"n": 0}
    real = kv_cache.GrowingLayer._rebuild
    monkeypatch.setattr(
        kv_cache.GrowingLayer,
        "_rebuild",
        lambda self, *a: rebuilds.__setitem__("n", rebuilds["n"] + 1) or real(self, *a),
    )
    ids = _repetitive(7)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert rebuilds["n"] == model.get_base_model().config.num_hidden_layers


def test_offered_only_for_the_plain_batch_one_greedy_call():
    model = _model()
    one = torch.ones(1, 5, dtype=torch.long)
    on = prompt_lookup.offer(model, (), {"input_ids": one, "do_sample": False})
    assert on["prompt_lookup_num_tokens"] == prompt_lookup.NUM_TOKENS
    for kwargs in (
        {"input_ids": torch.ones(2, 5, dtype=torch.long)},
        {"input_ids": one, "do_sample": True},
        {"input_ids": one, "num_beams": 2},
        {"input_ids": one, "num_return_sequences": 2},
        {"input_ids": one, "return_dict_in_generate": True},
        {"input_ids": one, "prompt_lookup_num_tokens": 7},
        {"input_ids": one, "streamer": object()},
        {"input_ids": one, "use_cache": False},
    ):
        assert prompt_lookup.offer(model, (), kwargs).get("prompt_lookup_num_tokens") == kwargs.get(
            "prompt_lookup_num_tokens"
        ), kwargs
    assert "prompt_lookup_num_tokens" not in prompt_lookup.offer(model, (one,), {})  # positional ids
    peftkit.set_prompt_lookup(False)
    try:
        assert "prompt_lookup_num_tokens" not in prompt_lookup.offer(model, (), {"input_ids": one})
    finally:
        peftkit.set_prompt_lookup(True)
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert "prompt_lookup_num_tokens" not in prompt_lookup.offer(prompt, (), {"input_ids": one})
