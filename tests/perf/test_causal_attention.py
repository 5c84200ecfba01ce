"""The blocked causal attention equals PyTorch's SDPA (output and q/k/v grads), and the training-forward
switch to it changes neither the loss nor any LoRA gradient, and always restores the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
import peftkit.fast_attention as fast_attention
from peftkit import LoraConfig, get_peft_model
from peftkit.functional.causal_attention import blocked_causal_attention


def _qkvg(b, h, kv, t, s, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, m, d, generator=g).to(dtype) for n, m in ((h, t), (kv, s), (kv, s)))
    return q, k, v, torch.randn(b, h, t, d, generator=g).to(dtype)


def _both(b, h, kv, t, s, d, mask=None, block=8, dtype=torch.float32):
    """(blocked, sdpa) results: each a list [output, dq, dk, dv]."""
    q, k, v, go = _qkvg(b, h, kv, t, s, d, dtype)
    visible = torch.ones(t, s, dtype=torch.bool).tril_(s - t)  # query i sits at position s - t + i
    if mask is not None:
        visible = visible & mask
    results = []
    for fn in (
        lambda q, k, v: blocked_causal_attention(q, k, v, d**-0.5, mask, block),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True),
    ):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(go)
        results.append([out.detach()] + [x.grad for x in leaves])
    return results


def _assert_close(got, ref, atol=1e-5, rtol=1e-5):
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize(
    "b,h,kv,t,s",
    [
        (2, 6, 2, 32, 32),  # GQA, T a multiple of the block
        (2, 4, 4, 29, 29),  # MHA, T not a multiple of the block
        (1, 6, 1, 21, 21),  # MQA
        (2, 6, 2, 1, 1),  # one query
        (2, 6, 2, 1, 13),  # one query after a 12-token prefix
        (2, 6, 2, 19, 45),  # S > T: the queries are the last T positions
    ],
)
def test_kernel_matches_sdpa(b, h, kv, t, s):
    got, ref = _both(b, h, kv, t, s, 16)
    _assert_close(got, ref)


@pytest.mark.parametrize("block", [1, 5, 64])
def test_block_size_does_not_change_the_result(block):
    got, ref = _both(2, 6, 2, 23, 30, 8, block=block)
    _assert_close(got, ref)


@pytest.mark.parametrize("s", [27, 40])
def test_padding_mask_right_and_left(s):
    t = 27
    mask = torch.ones(2, 1, 1, s, dtype=torch.bool)
    mask[0, ..., s - 6 :] = False  # right padding
    mask[1, ..., : s - t + 5] = False  # left padding: the first 5 queries see no key
    got, ref = _both(2, 6, 2, t, s, 16, mask=mask)
    _assert_close(got, ref)
    assert (got[0][1, :, :5] == 0).all()  # rows with no visible key give 0, as sdpa does


def test_fully_masked_rows_give_zero_and_no_nan():
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    mask[..., 3, :] = False
    mask[..., 7:, :] = False
    got, ref = _both(1, 4, 2, 12, 12, 8, mask=mask, block=4)
    _assert_close(got, ref)
    out, dq = got[0], got[1]
    assert (out[:, :, 3] == 0).all() and (out[:, :, 7:] == 0).all()
    assert (dq[:, :, 3] == 0).all() and (dq[:, :, 7:] == 0).all()


def test_mask_broadcast_over_queries_and_batch():
    mask = torch.rand(1, 1, 17, 17, generator=torch.Generator().manual_seed(3)) > 0.3
    got, ref = _both(3, 6, 3, 17, 17, 8, mask=mask)
    _assert_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32_sdpa(dtype):
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    mask[1, ..., :4] = False
    got, ref = _both(2, 6, 2, 30, 30, 16, mask=mask, dtype=dtype)
    _assert_close(got, ref, atol=5e-2, rtol=5e-2)


def test_transposed_inputs_as_transformers_passes_them():
    q, k, v, go = _qkvg(2, 6, 2, 20, 20, 8)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # (B, T, H, D) memory
    got, ref = [], []
    for fn, res in (
        (lambda *a: blocked_causal_attention(*a, 8**-0.5, block=6), got),
        (lambda *a: F.scaled_dot_product_attention(*a, is_causal=True, enable_gqa=True), ref),
    ):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(go)
        res.extend([out.detach()] + [x.grad for x in leaves])
        for x in leaves:
            x.grad = None
    _assert_close(got, ref)


def test_rejects_bad_shapes_and_float_masks():
    q, k, v, _ = _qkvg(1, 6, 4, 5, 5, 8)
    with pytest.raises(ValueError, match="KV"):
        blocked_causal_attention(q, k, v, 1.0)
    q, k, v, _ = _qkvg(1, 4, 2, 5, 5, 8)
    with pytest.raises(ValueError, match="boolean"):
        blocked_causal_attention(q, k, v, 1.0, mask=torch.zeros(1, 1, 5, 5))


# ----- model level -----------------------------------------------------------------------------------------


def _lora_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(LlamaForCausalLM(config), lora).train()


def _batch(padding):
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding:
        mask[0, 31:] = 0  # right padding
        mask[1, :9] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.fixture
def blocked_calls(monkeypatch):
    """Counts the blocked kernel's calls; the tiny test sequences are made long enough to use it."""
    monkeypatch.setattr(fast_attention, "MIN_QUERIES", 2)
    calls = []
    kernel = fast_attention.blocked_causal_attention
    monkeypatch.setattr(
        fast_attention, "blocked_causal_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    peftkit.set_fast_attention(True)  # off by default (see fast_attention's docstring)
    yield calls
    peftkit.set_fast_attention(False)


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("fused_loss", [True, False])
def test_training_step_equal_with_fast_attention_on_and_off(blocked_calls, padding, fused_loss):
    model, batch = _lora_llama(), _batch(padding)
    model.fused_causal_lm_loss = fused_loss
    results = []
    for on in (True, False):
        peftkit.set_fast_attention(on)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
        assert model.get_base_model().config._attn_implementation == "sdpa"
    assert len(blocked_calls) == 2  # two layers, only while switched on
    (loss_on, grads_on), (loss_off, grads_off) = results
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
    assert grads_on.keys() == grads_off.keys() and any("lora_A" in n for n in grads_on)
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)


def test_per_model_switch(blocked_calls):
    model = _lora_llama()
    model.fast_attention = False
    model(**_batch(False)).loss.backward()
    assert blocked_calls == []


def test_eval_and_no_grad_forwards_untouched(blocked_calls):
    model, batch = _lora_llama(), _batch(True)
    with torch.no_grad():
        model(**batch)
    model.eval()
    model(**batch).loss.backward()
    assert blocked_calls == []


def test_off_by_default(blocked_calls):
    peftkit.set_fast_attention(False)
    _lora_llama()(**_batch(False)).loss.backward()
    assert blocked_calls == []


def test_config_restored_after_a_forward_that_raises(blocked_calls, monkeypatch):
    model = _lora_llama()
    config = model.get_base_model().config
    seen = []

    def boom(*args, **kwargs):
        seen.append(config._attn_implementation)
        raise RuntimeError("boom")

    monkeypatch.setattr(fast_attention, "blocked_causal_attention", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(**_batch(False))
    assert seen == [fast_attention.NAME]
    assert config._attn_implementation == "sdpa"


def test_other_implementations_are_left_alone(blocked_calls):
    model = _lora_llama()
    config = model.get_base_model().config
    config._attn_implementation = "eager"
    model(**_batch(True)).loss.backward()
    assert blocked_calls == [] and config._attn_implementation == "eager"


def test_mask_allowing_future_keys_falls_back_to_sdpa(blocked_calls):
    """A 4D mask that lets a query see a later key is not causal: the plain sdpa path must run."""
    model, batch = _lora_llama(), _batch(False)
    mask = torch.ones(3, 1, 40, 40, dtype=torch.bool)  # bidirectional
    model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss.backward()
    assert blocked_calls == []


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padded"])
@pytest.mark.parametrize("s", [24, 33])
def test_registered_function_equals_transformers_sdpa(blocked_calls, mask_kind, s):
    """Same output and grads as transformers' sdpa_attention_forward, including a cache prefix (S > T)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t = 24
    q, k, v, go = _qkvg(2, 6, 2, t, s, 8)
    mask = None
    if mask_kind != "none":
        mask = torch.ones(2, 1, t, s, dtype=torch.bool).tril_(s - t)
        if mask_kind == "padded":
            mask[1, ..., : s - t + 3] = False
    results = []
    for fn in (fast_attention.peftkit_sdpa_attention_forward, sdpa_attention_forward):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _ = fn(_Attn(), *leaves, mask, dropout=0.0, scaling=0.3, position_ids=None, use_cache=True)
        out.backward(go.transpose(1, 2))
        results.append([out.detach()] + [x.grad for x in leaves])
    _assert_close(*results)
    # top-left-aligned sdpa semantics without a mask when S > T: left to sdpa itself
    expect_blocked = (mask_kind != "none" or s == t) and t >= fast_attention.MIN_QUERIES
    assert len(blocked_calls) == int(expect_blocked)


def test_registered_function_leaves_unusual_calls_to_sdpa(blocked_calls):
    q, k, v, _ = _qkvg(1, 6, 2, 24, 24, 8)
    q.requires_grad_()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for kwargs in ({"dropout": 0.1}, {"softcap": 30.0}, {"sliding_window": 8}, {"s_aux": torch.zeros(6)}):
        outcome = []  # what transformers' sdpa does with the call (a result or an error), and what ours does
        for fn in (sdpa_attention_forward, fast_attention.peftkit_sdpa_attention_forward):
            torch.manual_seed(0)  # the same dropout mask
            try:
                outcome.append(fn(_Attn(), q, k, v, None, **kwargs)[0].detach())
            except Exception as err:  # sdpa rejects some of these itself: ours must reject them the same way
                outcome.append(type(err))
        if isinstance(outcome[0], torch.Tensor):
            torch.testing.assert_close(outcome[1], outcome[0], atol=0, rtol=0, msg=str(kwargs))
        else:
            assert outcome[1] is outcome[0], kwargs
    with torch.no_grad():
        fast_attention.peftkit_sdpa_attention_forward(_Attn(), q, k, v, None)
    assert blocked_calls == []


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_fast_attention(blocked_calls, use_reentrant):
    """The backward recomputes each checkpointed layer outside the forward's swap: the layer must run the
    same attention both times (non-reentrant checkpointing raised CheckpointError), with the same result."""
    batch = _batch(True)
    plain = _lora_llama()
    plain.fused_causal_lm_loss = False
    peftkit.set_fast_attention(False)
    plain(**batch).loss.backward()
    peftkit.set_fast_attention(True)
    model = _lora_llama()
    model.fused_causal_lm_loss = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model(**batch).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert expected
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
