"""The fused causal-LM loss equals transformers' plain loss: value and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit.functional.lm_loss import causal_lm_loss
from tests.models import VOCAB, tiny_gpt2, tiny_llama, token_inputs


def _labels(ids: torch.Tensor, mode: str) -> torch.Tensor:
    labels = ids.clone()
    if mode == "prompt_masked":
        labels[:, : ids.shape[1] // 2] = -100
    elif mode == "ragged":
        labels[0, :3] = -100
        labels[1, -2:] = -100
    return labels


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 7])
def test_functional_matches_plain(chunk_rows, with_bias, num_items):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(VOCAB, 16, generator=g).requires_grad_()
    bias = torch.randn(VOCAB, generator=g).requires_grad_() if with_bias else None
    labels = _labels(torch.randint(0, VOCAB, (2, 9), generator=g), "ragged")

    ref = ForCausalLMLoss(F.linear(hidden, weight, bias), labels, VOCAB, num_items_in_batch=num_items)
    ref_grads = torch.autograd.grad(ref, [t for t in (hidden, weight, bias) if t is not None])
    got = causal_lm_loss(hidden, weight, labels, bias, num_items_in_batch=num_items, chunk_rows=chunk_rows)
    got_grads = torch.autograd.grad(got, [t for t in (hidden, weight, bias) if t is not None])

    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)


def _step_grads(model, inputs, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2's dropout draws the same masks on both paths
    out = model(**inputs, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("mode", ["all", "prompt_masked", "ragged"])
@pytest.mark.parametrize("full_finetune", [False, True])
def test_model_fused_equals_plain(make, mode, full_finetune):
    target = ["c_attn"] if make is tiny_gpt2 else ["q_proj", "v_proj"]
    model = get_peft_model(
        make(), LoraConfig(r=4, target_modules=target, task_type="CAUSAL_LM", init_lora_weights=False)
    )
    if full_finetune:  # the (tied) head weight trains too: its gradient comes from embedding and head
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    inputs = token_inputs(batch=3, seq=10)
    labels = _labels(inputs["input_ids"], mode)

    fused, fused_grads = _step_grads(model, inputs, labels, num_items_in_batch=torch.tensor(11))
    assert fused.logits is None
    model.fused_causal_lm_loss = False
    plain, plain_grads = _step_grads(model, inputs, labels, num_items_in_batch=torch.tensor(11))
    assert plain.logits is not None

    torch.testing.assert_close(fused.loss, plain.loss)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], msg=name)


def test_switch_and_eval_keep_logits():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    inputs = token_inputs()
    labels = inputs["input_ids"]
    model.train()
    assert model(**inputs, labels=labels).logits is None
    peftkit.set_fused_causal_lm_loss(False)
    try:
        assert model(**inputs, labels=labels).logits is not None
    finally:
        peftkit.set_fused_causal_lm_loss(True)
    model.eval()
    eval_out = model(**inputs, labels=labels)
    assert eval_out.logits.shape == (*labels.shape, VOCAB)
    model.train()
    with torch.no_grad():
        assert model(**inputs, labels=labels).logits is not None
    assert model(**inputs, labels=labels, output_hidden_states=True).logits is not None


def test_bf16_base_autocast_trains():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False))
    model.train()
    inputs = token_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    model.fused_causal_lm_loss = False
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**inputs, labels=inputs["input_ids"])
    ref.loss.backward()
    assert torch.isfinite(out.loss) and grads
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(grads[n]).all()
            torch.testing.assert_close(grads[n], p.grad, rtol=5e-2, atol=5e-3, msg=n)
