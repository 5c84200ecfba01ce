"""LoftQ: the NormalFloat quantizer, the alternating init, `init_lora_weights="loftq"` and
`replace_lora_weights_loftq`. HF peft 0.21.2's LoftQ needs bitsandbytes and a CUDA/XPU device, so it cannot run
here; the NF4 table is checked against QLoRA's published one, and the init against its own definition."""

from __future__ import annotations

import copy
import json

import peft as hf_peft
import pytest
import torch
from safetensors.torch import save_file

import peftkit
from peftkit.functional import loftq as FQ
from peftkit.tuners.lora_loftq import replace_lora_weights_loftq

from .models import tiny_gpt2, tiny_llama, token_inputs

# QLoRA's NF4 table (Dettmers et al., 2023, appendix; bitsandbytes' dequantization table)
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_nf4_levels_are_qlora_s():
    torch.testing.assert_close(FQ.nf_levels(4), torch.tensor(NF4), atol=1e-6, rtol=0)
    for bits in (2, 3, 8):
        levels = FQ.nf_levels(bits)
        assert levels.numel() == 2**bits and levels[0] == -1 and levels[-1] == 1 and (levels == 0).any()


def test_round_trip_is_on_the_grid_and_close():
    w = torch.randn(37, 50)  # not a multiple of the block: the last block is padded
    q = FQ.nf_round_trip(w)
    assert q.shape == w.shape and rel(q, w) < 0.15
    assert torch.equal(FQ.nf_round_trip(q), q)  # quantized values are fixed points
    with pytest.raises(ValueError, match="bits"):
        FQ.nf_levels(5)


def test_loftq_error_falls_with_iterations():
    """Rank 8 of a 64x128 matrix with a decaying spectrum (like trained weights)."""
    g = torch.Generator().manual_seed(0)
    U, V = (
        torch.linalg.qr(torch.randn(64, 64, generator=g))[0],
        torch.linalg.qr(torch.randn(128, 64, generator=g))[0],
    )
    w = (U * torch.logspace(0, -2, 64)) @ V.T
    quant_only = rel(FQ.nf_round_trip(w), w)
    errors = [rel(q + L @ R, w) for q, L, R in (FQ.loftq(w, 8, 4, n) for n in (1, 2, 5))]
    assert errors[0] < quant_only and errors[2] <= errors[0]


def loftq_config(**kw):
    return peftkit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
        loftq_config=peftkit.LoftQConfig(**kw),
    )  # fmt: skip


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_loftq_init_reconstructs_and_reloads(factory, tmp_path):
    original = factory()
    model = peftkit.get_peft_model(factory(), loftq_config(loftq_bits=4, loftq_iter=2))
    layer = next(m for m in model.modules() if isinstance(m, peftkit.tuners.lora.LoraLinear))
    w0 = dict(original.named_parameters())[layer.module_name + ".weight"].detach()
    q = layer.base_layer.weight.detach()
    adapted = q + layer.delta_weight("default")
    assert rel(adapted, w0) < rel(q, w0)  # Q + s*B@A is closer to W than Q
    assert torch.equal(
        FQ.nf_round_trip(q if not layer.transposed else q.T), q if not layer.transposed else q.T
    )
    # the adapter file reloads on the quantized base (peftkit does not re-run LoftQ when loading)
    inputs = token_inputs()
    model.save_pretrained(tmp_path)
    quantized_base = copy.deepcopy(model).unload()
    loaded = peftkit.PeftModel.from_pretrained(quantized_base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


def test_loftq_file_loads_in_hf(tmp_path):
    """HF re-runs LoftQ when a config says "loftq" (needing bitsandbytes + CUDA); its LoftQ example saves with
    init_lora_weights=True, which is what HF then needs. With that, HF reads our adapter with equal logits."""
    model = peftkit.get_peft_model(tiny_llama(), loftq_config())
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    assert data["init_lora_weights"] == "loftq" and data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    cfg_path.write_text(json.dumps({**data, "init_lora_weights": True, "loftq_config": {}}))
    theirs = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model).unload(), tmp_path)
    inputs = token_inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_loftq_config_errors():
    with pytest.raises(ValueError, match="loftq"):
        peftkit.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq"):
        peftkit.LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="loftq_bits"):
        peftkit.LoftQConfig(loftq_bits=5)
    with pytest.raises(ValueError, match="loftq_iter"):
        peftkit.LoftQConfig(loftq_iter=0)


def test_replace_lora_weights_loftq(tmp_path):
    original = tiny_llama()
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, tmp_path / "model.safetensors")
    # a "quantized" base: every Linear rounded to NF4, as a quantized checkpoint would hold
    quantized = tiny_llama()
    with torch.no_grad():
        for name, p in quantized.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(FQ.nf_round_trip(p))
    model = peftkit.get_peft_model(quantized, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inputs = token_inputs()
    with torch.no_grad():
        before = (model(**inputs).logits - original(**inputs).logits).abs().mean().item()
    seen = []
    replace_lora_weights_loftq(model, model_path=str(tmp_path), callback=lambda m, n: seen.append(n) or True)
    with torch.no_grad():
        after = (model(**inputs).logits - original(**inputs).logits).abs().mean().item()
    assert after < before and len(seen) == 4
    # a callback returning False undoes that module's replacement
    model2 = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    replace_lora_weights_loftq(model2, callback=lambda m, n: False)
    with torch.no_grad():
        torch.testing.assert_close(model2(**inputs).logits, original(**inputs).logits)
    with pytest.raises(ValueError, match="adapter 'other'"):
        replace_lora_weights_loftq(model2, adapter_name="other")
