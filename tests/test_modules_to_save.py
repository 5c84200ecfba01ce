"""`ModulesToSaveWrapper` delegates attributes to the active copy, as HF peft's wrapper does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.modules_to_save import ModulesToSaveWrapper

from .models import tiny_bert_cls


def test_wrapper_delegates_every_attribute_to_the_active_module():
    wrapper = ModulesToSaveWrapper(nn.Linear(4, 3), "default")
    with torch.no_grad():
        wrapper.modules_to_save["default"].bias.fill_(7.0)
    assert (wrapper.in_features, wrapper.out_features) == (4, 3)
    assert torch.equal(wrapper.bias, torch.full((3,), 7.0))  # the trainable copy's, not the original's
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    wrapper.disable_adapters = True
    assert torch.equal(wrapper.bias, wrapper.original_module.bias)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        getattr(wrapper, "no_such_attribute")  # noqa: B009


def test_wrapped_classifier_exposes_bias_and_features():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    head = model.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    assert head.bias is head.modules_to_save["default"].bias
    assert head.out_features == head.original_module.out_features
