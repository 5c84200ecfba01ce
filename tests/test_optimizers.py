"""LoRA+ parameter groups."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.optimizers import create_loraplus_optimizer

from .models import tiny_gpt2, tiny_llama, token_inputs


def test_loraplus_groups_and_learning_rates():
    cfg = peftkit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], bias="lora_only")
    model = peftkit.get_peft_model(tiny_llama(), cfg)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault((g["lr"], g["weight_decay"]), set()).update(names[id(p)] for p in g["params"])
    assert all("lora_A" in n for n in by_lr[(1e-3, 0.1)])
    assert all("lora_embedding_" in n for n in by_lr[(1e-6, 0.1)])
    assert by_lr[(16e-3, 0.1)] and all("lora_B" in n for n in by_lr[(16e-3, 0.1)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_lr.values()) == trainable
    loss = model(**token_inputs(), labels=token_inputs()["input_ids"]).loss
    loss.backward()
    opt.step()


def test_loraplus_rejects_bad_ratio():
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4))
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)


def test_loraplus_biases_get_the_b_rate_without_weight_decay():
    """Trained biases (bias="all") form the no-decay group: B's learning rate, weight decay 0."""
    model = peftkit.get_peft_model(
        tiny_gpt2(), peftkit.LoraConfig(r=4, target_modules=["c_attn"], bias="all")
    )
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["lr"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases and groups[(16e-3, 0.0)] == biases
    assert all("lora_B" in n for n in groups[(16e-3, 0.1)]) and all(
        "lora_A" in n for n in groups[(1e-3, 0.1)]
    )
    # weight decay really skips them: with zero gradients, AdamW leaves a bias alone and shrinks lora_B
    bias = next(p for n, p in model.named_parameters() if n in biases)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.fill_(1.0)
    before_bias, before_b = bias.detach().clone(), lora_b.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    assert torch.equal(bias, before_bias) and (lora_b < before_b).all()
