"""QLoRA: adapters on bitsandbytes 4-bit/8-bit bases (CPU backend), side by side with transformers + HF peft.

The reference side is transformers' `BitsAndBytesConfig` loading of the same saved checkpoint plus HF peft;
peftkit's side is `peftkit.stream_load.load_quantized` (tensor-by-tensor, never the fp32 model) plus peftkit.
"""

from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
hf_peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import peftkit  # noqa: E402
from peftkit.quantized import dequantize_linears_, dequantize_weight  # noqa: E402
from peftkit.stream_load import iter_safetensors, load_quantized, safetensors_files  # noqa: E402
from tests.models import token_inputs  # noqa: E402

SPECS = {
    "nf4": dict(bits=4, quant_type="nf4", double_quant=True),
    "fp4": dict(bits=4, quant_type="fp4", double_quant=False),
    "int8": dict(bits=8),
}


def tiny_llama64(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose Linear inputs are >= 64 wide: bitsandbytes 0.50's CPU dequantization is wrong for
    rows shorter than its 64-weight block (both libraries then agree on wrong weights), so no 32-wide layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama64().save_pretrained(folder)
    return folder


def _reference(folder, spec: str):
    """transformers' own bitsandbytes loading of the checkpoint (what HF peft users run)."""
    s = SPECS[spec]
    if s["bits"] == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=s["quant_type"],
            bnb_4bit_use_double_quant=s["double_quant"],
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32)


def _ours(folder, spec: str):
    return load_quantized(folder, **SPECS[spec])


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("spec", ["nf4", "fp4", "int8"])
def test_lean_load_gives_transformers_quantized_model(checkpoint, spec):
    """Same layers, same packed codes, same logits as transformers' BitsAndBytesConfig loading."""
    ref, ours = _reference(checkpoint, spec), _ours(checkpoint, spec)
    q_ref, q_ours = ref.model.layers[1].mlp.down_proj, ours.model.layers[1].mlp.down_proj
    assert type(q_ref) is type(q_ours)
    assert torch.equal(dequantize_weight(q_ref), dequantize_weight(q_ours))
    assert type(ours.lm_head) is torch.nn.Linear  # the head stays in full precision, as in transformers
    assert getattr(ours, f"is_loaded_in_{SPECS[spec]['bits']}bit")
    x = token_inputs()
    torch.testing.assert_close(_logits(ours, x), _logits(ref, x), rtol=0, atol=1e-6)


def test_lean_bf16_load_equals_from_pretrained(checkpoint):
    """bits=None: a plain model read straight into bf16, equal to transformers' bf16 loading."""
    ours = load_quantized(checkpoint, bits=None, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x = token_inputs()
    torch.testing.assert_close(_logits(ours, x), _logits(ref, x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec,kind", [("nf4", "lora"), ("nf4", "dora"), ("fp4", "ia3"), ("int8", "lora"), ("int8", "dora")]
)
def test_adapter_files_load_both_ways_with_hf_peft(checkpoint, tmp_path, spec, kind):
    """HF peft's adapter trained on a quantized base gives, in peftkit, HF peft's outputs; and back."""
    if kind == "ia3":
        targets = dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        theirs_cfg = hf_peft.IA3Config(**targets, init_ia3_weights=False)
        ours_cfg = peftkit.IA3Config(**targets, init_ia3_weights=False)
    else:
        opts = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        theirs_cfg = hf_peft.LoraConfig(**opts, use_dora=kind == "dora")
        ours_cfg = peftkit.LoraConfig(**opts, use_dora=kind == "dora")
    torch.manual_seed(1)
    theirs = hf_peft.get_peft_model(_reference(checkpoint, spec), theirs_cfg)
    torch.manual_seed(2)
    ours = peftkit.get_peft_model(_ours(checkpoint, spec), ours_cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    x = token_inputs()
    theirs_in_ours = peftkit.PeftModel.from_pretrained(_ours(checkpoint, spec), tmp_path / "theirs")
    ours_in_theirs = hf_peft.PeftModel.from_pretrained(_reference(checkpoint, spec), tmp_path / "ours")
    theirs_out, ours_out = _logits(theirs, x), _logits(ours, x)  # (HF peft's int8 DoRA fails a 2nd forward)
    torch.testing.assert_close(_logits(theirs_in_ours, x), theirs_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(ours_in_theirs, x), ours_out, rtol=0, atol=1e-5)
    assert not torch.allclose(ours_out, theirs_out)  # two different adapters really compared


@pytest.mark.parametrize("spec", ["nf4", "int8"])
def test_training_on_quantized_base(checkpoint, tmp_path, spec):
    """prepare_model_for_kbit_training + LoRA: the loss falls, the packed base weights do not change, and the
    saved adapter gives the same outputs in HF peft on transformers' quantized model."""
    base = peftkit.prepare_model_for_kbit_training(_ours(checkpoint, spec))
    assert base.is_gradient_checkpointing
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    x = token_inputs(batch=2, seq=16)
    x["labels"] = x["input_ids"]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, p in model.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(p, frozen[key]), name
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    theirs = hf_peft.PeftModel.from_pretrained(_reference(checkpoint, spec), tmp_path / "adapter")
    mine = peftkit.PeftModel.from_pretrained(_ours(checkpoint, spec), tmp_path / "adapter")
    torch.testing.assert_close(_logits(theirs, x), _logits(model, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(mine, x), _logits(model, x), rtol=0, atol=0)


def _trained_lora(model_cls_loader, cfg_cls, get_peft_model):
    torch.manual_seed(3)
    return get_peft_model(
        model_cls_loader(), cfg_cls(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )


def test_merge_on_4bit_base(checkpoint, tmp_path):
    """merge_and_unload on NF4 dequantizes, merges and requantizes with a warning, giving HF peft's merged
    model; unmerge restores the packed weights bit for bit; unload returns the quantized base intact; after
    dequantize_linears_ the merge is exact (merged == unmerged outputs within fp32 rounding)."""
    x = token_inputs()
    ours = _trained_lora(lambda: _ours(checkpoint, "nf4"), peftkit.LoraConfig, peftkit.get_peft_model)
    ours.save_pretrained(tmp_path / "a")
    theirs = hf_peft.PeftModel.from_pretrained(_reference(checkpoint, "nf4"), tmp_path / "a")
    unmerged = _logits(ours, x)
    q = ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    packed, original = q.weight.data.clone(), dequantize_weight(q)
    delta = ours.get_base_model().model.layers[0].self_attn.q_proj.delta_weight("default").detach()

    ours.merge_adapter()
    merged = _logits(ours, x)
    ours.unmerge_adapter()
    assert torch.equal(q.weight.data, packed)
    torch.testing.assert_close(_logits(ours, x), unmerged, rtol=0, atol=0)

    with pytest.warns(UserWarning, match="4-bit quantized base .* rounding"):
        ours_merged = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_merged = theirs.merge_and_unload()
    assert type(ours_merged.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    torch.testing.assert_close(_logits(ours_merged, x), _logits(theirs_merged, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(ours_merged, x), merged, rtol=0, atol=0)
    assert (merged - unmerged).abs().max() > 0  # the rounding is real (and warned about)
    # the documented tolerance: each merged weight is within half the widest NF4 step (0.139, +0.02 for the
    # double-quantized absmax) of the exact dequant(W) + dW, relative to the absmax of its 64-weight block
    exact_w = original + delta
    got = dequantize_weight(ours_merged.model.layers[0].self_attn.q_proj)
    blocks = exact_w.flatten().reshape(-1, 64)
    err = (got.flatten().reshape(-1, 64) - blocks).abs()
    assert (err <= 0.16 * blocks.abs().amax(1, keepdim=True)).all()

    again = _trained_lora(lambda: _ours(checkpoint, "nf4"), peftkit.LoraConfig, peftkit.get_peft_model)
    bare = again.unload()
    fresh = _ours(checkpoint, "nf4")
    for (name, a), (_, b) in zip(bare.state_dict().items(), fresh.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name

    exact = _trained_lora(lambda: _ours(checkpoint, "nf4"), peftkit.LoraConfig, peftkit.get_peft_model)
    before = _logits(exact, x)
    dequantize_linears_(exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rounding warning: the base is full precision now
        plain = exact.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(_logits(plain, x), before, rtol=0, atol=2e-5)


def test_lean_loader_errors_name_the_fault(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_quantized(tmp_path)
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = dict(iter_safetensors(safetensors_files(checkpoint)[0]))
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 7)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"model.safetensors: model.layers.0.self_attn.q_proj.weight: shape \(5, 7\)"
    ):
        load_quantized(tmp_path)


def test_pissa_init_on_quantized_base_is_refused(checkpoint):
    with pytest.raises(ValueError, match="rewrites the base weight, which is 4-bit quantized"):
        peftkit.get_peft_model(
            _ours(checkpoint, "nf4"), peftkit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa")
        )


def test_peftkit_on_transformers_quantized_model(checkpoint):
    """A model transformers quantized itself (BitsAndBytesConfig) takes peftkit adapters like our own."""
    x = token_inputs()
    config = peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True)
    outs = []
    for load in (lambda: _reference(checkpoint, "nf4"), lambda: _ours(checkpoint, "nf4")):
        torch.manual_seed(4)
        outs.append(_logits(peftkit.get_peft_model(load(), config), x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
