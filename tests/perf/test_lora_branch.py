"""The in-place LoRA branch equals the straightforward `base(x) + B(A(dropout(x)) * s)`: output and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import LoraConfig, get_peft_model
from peftkit.functional.lora_branch import lora_branch_
from peftkit.tuners.lora import LoraLinear
from tests.models import tiny_gpt2, tiny_llama, token_inputs


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_grad", [False, True])
def test_functional_equals_plain(p, x_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g).requires_grad_(x_grad)
    W = torch.randn(10, 12, generator=g).requires_grad_()
    A = torch.randn(4, 12, generator=g).requires_grad_()
    B = torch.randn(10, 4, generator=g).requires_grad_()
    leaves = [t for t in (x, W, A, B) if t.requires_grad]
    upstream = torch.randn(3, 5, 10, generator=g)

    torch.manual_seed(7)
    ref = F.linear(x, W) + F.linear(F.linear(F.dropout(x, p, training=True), A) * 0.5, B)
    ref_grads = torch.autograd.grad(ref, leaves, upstream)
    torch.manual_seed(7)  # the same dropout mask
    got = lora_branch_(F.linear(x, W), x, A, B, 0.5, p, training=True)
    got_grads = torch.autograd.grad(got, leaves, upstream)

    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)


def _loss_and_grads(model, inputs, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_in_place_equals_plain(make, dropout, monkeypatch):
    config = LoraConfig(
        r=4, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(make(), config).train()
    inputs = token_inputs(batch=2, seq=9)
    fast_loss, fast = _loss_and_grads(model, inputs)
    monkeypatch.setattr(LoraLinear, "_in_place_ok", lambda self, *a: False)
    plain_loss, plain = _loss_and_grads(model, inputs)

    torch.testing.assert_close(fast_loss, plain_loss)
    assert fast.keys() == plain.keys() and len(fast) > 4
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], msg=name)


def test_in_place_path_is_taken_and_eval_output_matches(monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(2, 3, layer.in_features)
    assert layer._in_place_ok("default", layer.base_layer(x), x)
    with torch.no_grad():
        fast = model(**token_inputs()).logits
        monkeypatch.setattr(LoraLinear, "_in_place_ok", lambda self, *a: False)
        plain = model(**token_inputs()).logits
    torch.testing.assert_close(fast, plain)
