"""The growing KV cache (`kv_cache.GrowingLayer`): `generate` writes each step into spare room instead of
concatenating, and gives what transformers' own `DynamicLayer` gives."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicLayer

import peftkit
from peftkit import LoraConfig, get_peft_model, kv_cache
from tests.models import tiny_gpt2, tiny_llama

PAD = 0


def _model(factory=tiny_llama):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(factory(), config).eval()


def _left_padded(lengths=(9, 13, 6), seed=3):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # no common opening: the plain path, not the shared prefix
        ids[i, width - n :] = torch.randint(1, 128, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def _generate(model, grow: bool, **kw):
    ids, mask = _left_padded()
    peftkit.set_growing_cache(grow)
    try:
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD, **kw
        )
    finally:
        peftkit.set_growing_cache(True)


@pytest.fixture
def rebuilds(monkeypatch):
    """How many times a GrowingLayer allocated its buffers."""
    count = {"n": 0}
    real = kv_cache.GrowingLayer._rebuild

    def spy(self, *a, **k):
        count["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(kv_cache.GrowingLayer, "_rebuild", spy)
    return count


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_generate_with_growing_cache_equals_dynamic_cache(factory, rebuilds):
    model = _model(factory)
    plain = _generate(model, grow=False)
    assert rebuilds["n"] == 0
    grown = _generate(model, grow=True)
    assert torch.equal(grown, plain)
    layers = model.get_base_model().config.num_hidden_layers
    # one allocation per layer for the whole call: prompt + 12 new tokens fit in the first buffer
    assert rebuilds["n"] == layers


def test_returned_cache_holds_the_same_states():
    model = _model()
    kw = dict(return_dict_in_generate=True)
    plain, grown = _generate(model, False, **kw), _generate(model, True, **kw)
    assert torch.equal(grown.sequences, plain.sequences)
    for a, b in zip(plain.past_key_values.layers, grown.past_key_values.layers):
        assert type(a) is DynamicLayer and type(b) is kv_cache.GrowingLayer
        torch.testing.assert_close(b.keys, a.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.values, a.values, rtol=0, atol=1e-6)


def test_shared_prefix_generate_uses_it_and_matches(rebuilds):
    model = _model()
    g = torch.Generator().manual_seed(5)
    head = torch.randint(1, 128, (10,), generator=g).tolist()
    rows = [head + torch.randint(1, 128, (n,), generator=g).tolist() for n in (3, 6, 2)]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = (ids != PAD).long()
    outs = []
    for grow in (False, True):
        peftkit.set_growing_cache(grow)
        try:
            outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
        finally:
            peftkit.set_growing_cache(True)
    assert torch.equal(outs[0], outs[1])
    assert rebuilds["n"] > 0  # the broadcast prefix cache was turned into growing layers


def test_layer_operations_match_dynamic_layer():
    """Updates mixed with crop, beam reordering and batch selection give DynamicLayer's tensors."""
    g = torch.Generator().manual_seed(0)
    ref, grow = DynamicLayer(), kv_cache.GrowingLayer()

    def both(op, *a):
        getattr(ref, op)(*a)
        getattr(grow, op)(*a)
        assert torch.equal(grow.keys, ref.keys) and torch.equal(grow.values, ref.values)

    def step(batch, n):
        k, v = torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, 4, generator=g)
        out_ref, out_grow = ref.update(k, v), grow.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(out_ref, out_grow))

    step(4, 5)
    for _ in range(3):
        step(4, 1)
    both("crop", -2)
    step(4, 1)
    both("reorder_cache", torch.tensor([3, 1, 1, 0]))
    step(4, 2)
    both("batch_select_indices", torch.tensor([0, 2]))
    step(2, 1)
    for _ in range(200):  # past the first buffer: it grows, keeping what it holds
        step(2, 1)
    assert grow.get_seq_length() == ref.get_seq_length() == 5 + 3 - 2 + 1 + 2 + 1 + 200
    grow.reset()
    assert grow.get_seq_length() == 0
    grow.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert grow.keys.shape == (1, 2, 3, 4)


def test_only_plain_full_attention_models_get_it():
    assert kv_cache.growing_cache(tiny_llama()) is not None
    config = MistralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    assert kv_cache.growing_cache(MistralForCausalLM(config)) is None  # a sliding window: transformers' cache
    peftkit.set_growing_cache(False)
    try:
        assert kv_cache.growing_cache(tiny_llama()) is None
    finally:
        peftkit.set_growing_cache(True)


def test_callers_own_cache_and_beams_are_left_alone(rebuilds):
    model = _model()
    _generate(model, True, num_beams=2)
    _generate(model, True, use_cache=False)
    assert rebuilds["n"] == 0
