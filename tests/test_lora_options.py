"""LoRA options beyond the conformance battery's cases: bad values give errors that name the fault, and the
behaviours the battery does not see (merging a bias, ...), side by side with HF peft where it has them."""

from __future__ import annotations

import peft as hf_peft
import pytest
import torch

import peftkit

from .models import image_inputs, tiny_convnet, tiny_gpt2, tiny_llama, token_inputs


def logits(model, inputs=None):
    with torch.no_grad():
        out = model(**(inputs or token_inputs()))
    return out if isinstance(out, torch.Tensor) else out.logits


# ----- lora_bias -----
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_dora": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "lora_bias"),
    ],
)
def test_lora_bias_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        peftkit.LoraConfig(lora_bias=True, **kwargs)


def test_lora_bias_on_embedding_is_refused():
    config = peftkit.LoraConfig(target_modules=["embed_tokens"], lora_bias=True)
    with pytest.raises(ValueError, match="embed_tokens.*lora_bias"):
        peftkit.get_peft_model(tiny_llama(), config)


def test_lora_bias_without_base_bias_warns_and_cannot_merge():
    config = peftkit.LoraConfig(target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    with pytest.warns(UserWarning, match="q_proj.*no bias"):
        model = peftkit.get_peft_model(tiny_llama(), config)
    before = logits(model)
    with pytest.raises(ValueError, match="q_proj.*lora_bias"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model), before)  # all-or-nothing: nothing stayed merged


def test_lora_bias_matches_hf_after_training_the_bias(tmp_path):
    """B's bias is scaled like the rest of the branch (HF: `B(A(x)) * scaling`)."""
    config = {"r": 4, "lora_alpha": 16, "lora_bias": True, "target_modules": ["c_attn"]}
    ours = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(**config))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ours.save_pretrained(tmp_path)
    theirs = hf_peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(theirs), atol=1e-5, rtol=1e-5)


def test_lora_bias_conv2d_merge_moves_the_bias():
    config = peftkit.LoraConfig(target_modules=["conv1"], lora_bias=True, init_lora_weights=False)
    model = peftkit.get_peft_model(tiny_convnet(), config)
    base_bias = model.base_model.model.conv1.base_layer.bias.detach().clone()
    out = logits(model, image_inputs())
    model.merge_adapter()
    assert not torch.equal(model.base_model.model.conv1.base_layer.bias, base_bias)
    torch.testing.assert_close(logits(model, image_inputs()), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.conv1.base_layer.bias, base_bias)
