"""peftkit.helpers.rescale_adapter_scale, cast_mixed_precision_params and optimizers.create_lorafa_optimizer,
side by side with HF peft."""

from __future__ import annotations

import peft as hf_peft
import pytest
import torch
from peft.helpers import rescale_adapter_scale as hf_rescale
from peft.optimizers import create_lorafa_optimizer as hf_lorafa

import peftkit
from peftkit.helpers import rescale_adapter_scale
from peftkit.optimizers import create_lorafa_optimizer

from .models import tiny_llama, token_inputs


def pair(**config):
    """The same random-init LoRA model in both libraries (ours saved, loaded into HF)."""
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(init_lora_weights=False, **config))
    theirs = hf_peft.get_peft_model(tiny_llama(), hf_peft.LoraConfig(init_lora_weights=False, **config))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def logits(model):
    with torch.no_grad():
        return model(**token_inputs()).logits


@pytest.mark.parametrize("multiplier", [0.0, 0.5, 2])
def test_rescale_adapter_scale_matches_hf_and_restores(multiplier):
    ours, theirs = pair(r=4, lora_alpha=8)
    before = logits(ours)
    with rescale_adapter_scale(ours, multiplier), hf_rescale(theirs, multiplier):
        torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
        if multiplier == 0.0:
            with ours.disable_adapter():
                base = logits(ours)
            torch.testing.assert_close(logits(ours), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours), before)
    with pytest.raises(RuntimeError), rescale_adapter_scale(ours, 3.0):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(ours), before)  # restored after an exception too


def test_rescale_adapter_scale_errors():
    ours, _ = pair(r=2)
    with pytest.raises(TypeError, match="multiplier"), rescale_adapter_scale(ours, "2"):
        pass
    with pytest.raises(ValueError, match="no LoRA layers"), rescale_adapter_scale(tiny_llama(), 2.0):
        pass
    ours.merge_adapter()
    with pytest.raises(ValueError, match="merged"), rescale_adapter_scale(ours, 2.0):
        pass


def test_lorafa_matches_hf_over_steps(monkeypatch):
    import peft.optimizers.lorafa as hf_lorafa_module

    # HF projects B's gradient under bf16 autocast when the CPU has bf16; compare the fp32 math
    monkeypatch.setattr(hf_lorafa_module, "is_bf16_available", lambda: False)
    ours, theirs = pair(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    opt_ours = create_lorafa_optimizer(ours, r=4, lora_alpha=16, lr=1e-2, weight_decay=0.01)
    opt_theirs = hf_lorafa(theirs, r=4, lora_alpha=16, lr=1e-2, weight_decay=0.01)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    inputs = token_inputs()
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
            opt.step()
    mine, hf = ours.state_dict(), theirs.state_dict()
    diff = max((mine[k] - hf[k]).abs().max().item() for k in mine if "lora_B" in k)
    assert diff < 1e-5, diff


def test_lorafa_errors():
    ours, _ = pair(r=2, use_rslora=False)
    with pytest.raises(ValueError, match="use_rslora"):
        create_lorafa_optimizer(ours, r=2, lora_alpha=4, lr=1e-3, use_rslora=True)
    with pytest.raises(ValueError, match="no LoRA layers"):
        create_lorafa_optimizer(tiny_llama(), r=2, lora_alpha=4, lr=1e-3)
    with pytest.raises(ValueError, match="r and lora_alpha"):
        create_lorafa_optimizer(ours, r=0, lora_alpha=4, lr=1e-3)


def test_cast_mixed_precision_params_matches_hf():
    ours, theirs = pair(r=2)
    peftkit.cast_mixed_precision_params(ours, torch.bfloat16)
    hf_peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {
        n: p.dtype for n, p in theirs.named_parameters()
    }
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    # bf16 base: the libraries round the fp32 LoRA branch into bf16 activations at slightly different points
    torch.testing.assert_close(logits(ours).float(), logits(theirs).float(), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="floating"):
        peftkit.cast_mixed_precision_params(ours, torch.int8)
