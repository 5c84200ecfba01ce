"""LoRA+ parameter groups."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.optimizers import create_loraplus_optimizer

from .models import tiny_llama, token_inputs


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
