"""`generate` (one adapter and mixed adapters) runs the LM head on contiguous inputs (`head_input`): with a frozen
head, torch runs a non-contiguous (batch, k, hidden) slice as a batched GEMV over the expanded weight."""

from __future__ import annotations

import pytest
import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.head_input import contiguous_head_input
from tests.models import tiny_llama


def _model():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config).eval()
    model.add_adapter("other", config)
    model.set_adapter("default")
    return model


@pytest.mark.parametrize("mixed", [False, True])
def test_generate_gives_the_head_contiguous_inputs_and_removes_the_hook(mixed):
    model = _model()
    head = model.get_output_embeddings()
    assert not head.weight.requires_grad  # the case torch runs as bmm when the input is a strided slice
    seen = []
    recorder = head.register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape, args[0].is_contiguous()))
    )
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    extra = {"adapter_names": ["default", "other", "__base__"]} if mixed else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **extra)
    recorder.remove()
    assert out.shape == (3, 11)
    assert seen and all(contiguous for _, contiguous in seen), seen
    assert not head._forward_pre_hooks  # removed on exit


def test_context_keeps_the_values_and_leaves_other_heads_alone():
    model = _model()
    head = model.get_output_embeddings()
    hidden = torch.randn(4, 6, head.in_features)
    sliced = hidden[:, -2:]
    assert not sliced.is_contiguous()
    want = head(sliced)
    with contiguous_head_input(model):
        got = head(sliced)
        assert len(head._forward_pre_hooks) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not head._forward_pre_hooks
    # a head that is not a plain nn.Linear (here: an adapted one) is left as it is
    adapted = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["lm_head"]))
    assert type(adapted.get_output_embeddings()) is not torch.nn.Linear
    with contiguous_head_input(adapted):
        assert not adapted.get_output_embeddings()._forward_pre_hooks
