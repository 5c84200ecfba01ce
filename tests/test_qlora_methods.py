"""Which methods run on a bitsandbytes-quantized base: LoRA (DoRA, rsLoRA) and IA3 (tests/test_qlora.py);
every other weight method is refused up front with one error naming the module, and the model is untouched."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

import peftkit  # noqa: E402
from peftkit.quantized import is_quantized_linear  # noqa: E402
from peftkit.stream_load import load_quantized  # noqa: E402
from tests.test_qlora import tiny_llama64  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-methods")
    tiny_llama64().save_pretrained(folder)
    return folder


CONFIGS = {
    "LOHA": lambda: peftkit.LoHaConfig(target_modules=["q_proj", "v_proj"]),
    "LOKR": lambda: peftkit.LoKrConfig(target_modules=["q_proj", "v_proj"]),
    "OFT": lambda: peftkit.OFTConfig(target_modules=["q_proj", "v_proj"]),
    "VERA": lambda: peftkit.VeraConfig(target_modules=["q_proj", "v_proj"]),
    "ADALORA": lambda: peftkit.AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=10),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_unsupported_method_on_quantized_base_is_one_clear_error(checkpoint, method):
    base = load_quantized(checkpoint, bits=4)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    with pytest.raises(ValueError) as err:
        peftkit.get_peft_model(base, CONFIGS[method]())
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message and "4-bit Linear4bit" in message, message
    assert method in message and "LoRA" in message and "IA3" in message, message
    q = base.model.layers[0].self_attn.q_proj
    assert is_quantized_linear(q) and not hasattr(q, "base_layer")  # nothing was wrapped
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n


def test_method_on_unquantized_modules_of_a_quantized_model_still_works(checkpoint):
    """The check is about the targets: LN tuning of the (float) norms of a 4-bit model is fine."""
    base = load_quantized(checkpoint, bits=4)
    model = peftkit.get_peft_model(base, peftkit.LNTuningConfig())
    x = torch.randint(0, 128, (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
