"""`PeftModel.generate` runs the prompts' common opening once (generate_prefix) and returns what the plain
left-padded call returns."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoraConfig, get_peft_model, shared_prefix
from tests.models import tiny_gpt2, tiny_llama

PAD = 0


def _model(factory=tiny_llama):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(factory(), config).eval()


def _prompts(lengths=(14, 11, 17, 12), shared=9, seed=2):
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 128, (shared,), generator=g).tolist()
    return [head + torch.randint(1, 128, (n - shared,), generator=g).tolist() for n in lengths]


def _left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture
def calls(monkeypatch):
    """How many times the shared prefix ran."""
    count = {"n": 0}
    real = shared_prefix.prefix_cache

    def spy(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(shared_prefix, "prefix_cache", spy)
    return count


def _generate(model, ids, mask, shared: bool, **kw):
    peftkit.set_shared_prefix(shared)
    try:
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, **kw
        )
    finally:
        peftkit.set_shared_prefix(True)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_shared_prefix_generate_equals_plain(factory, calls):
    model = _model(factory)
    ids, mask = _left_pad(_prompts())
    plain = _generate(model, ids, mask, shared=False)
    assert calls["n"] == 0
    got = _generate(model, ids, mask, shared=True)
    assert calls["n"] == 1
    assert torch.equal(got, plain)
    assert torch.equal(got[:, : ids.shape[1]], ids)  # the caller's own layout comes back


def test_no_mask_equal_lengths(calls):
    model = _model()
    ids, _ = _left_pad(_prompts(lengths=(13, 13, 13)))
    got = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert calls["n"] == 1
    peftkit.set_shared_prefix(False)
    try:
        plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    finally:
        peftkit.set_shared_prefix(True)
    assert torch.equal(got, plain)


def test_short_common_prefix_right_padding_and_beams_run_plain(calls):
    model = _model()
    ids, mask = _left_pad(_prompts(shared=3))  # below MIN_PREFIX
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    ids, mask = _left_pad(_prompts())
    right_ids, right_mask = ids.flip(1), mask.flip(1)
    model.generate(
        input_ids=right_ids, attention_mask=right_mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD
    )
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=PAD)
    model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, pad_token_id=PAD
    )
    assert calls["n"] == 0


def test_mixed_adapter_rows_run_plain(calls):
    model = _model()
    torch.manual_seed(1)
    model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    ids, mask = _left_pad(_prompts())
    names = ["default", "other", "__base__", "other"]
    got = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=PAD,
        adapter_names=names,
    )
    assert calls["n"] == 0
    for i, name in enumerate(names):
        row = dict(
            input_ids=ids[i : i + 1, mask[i].argmax() :], max_new_tokens=5, do_sample=False, pad_token_id=PAD
        )
        if name == "__base__":
            with model.disable_adapter():
                ref = model.generate(**row)
        else:
            model.set_adapter(name)
            ref = model.generate(**row)
        assert torch.equal(got[i, ids.shape[1] :], ref[0, row["input_ids"].shape[1] :])
