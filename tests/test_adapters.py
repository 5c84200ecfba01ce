"""Multiple adapters, switching, merging safety, target errors, and files that must not lose data."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

import peftkit
from peftkit import io

from .models import ConvNet, output_tensor, tiny_gpt2, tiny_llama, token_inputs


def logits(model, inputs=None):
    with torch.no_grad():
        return output_tensor(model(**(inputs or token_inputs()))).float()


def lora(**kw):
    return peftkit.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw)


def test_add_set_delete_adapters_and_subfolders(tmp_path):
    model = peftkit.get_peft_model(tiny_llama(), lora(r=4))
    model.add_adapter("other", lora(r=2, target_modules=["k_proj"]))
    assert model.active_adapter == "default"
    out_default = logits(model)
    # the inactive adapter's tensors are frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    out_other = logits(model)
    assert not torch.allclose(out_default, out_other)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n and ".other." in n)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    reloaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(reloaded), out_default)
    reloaded.set_adapter("other")
    torch.testing.assert_close(logits(reloaded), out_other)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), out_default)


def test_unknown_adapter_names_list_the_known_ones():
    model = peftkit.get_peft_model(tiny_llama(), lora(r=4))
    with pytest.raises(ValueError, match="Adapter 'nope' does not exist; known adapters: 'default'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="known adapters: 'default'"):
        model.delete_adapter("nope")


def test_target_not_found_lists_existing_modules():
    with pytest.raises(ValueError) as err:
        peftkit.get_peft_model(tiny_llama(), lora(target_modules=["qkv"]))
    msg = str(err.value)
    assert "['qkv']" in msg and "q_proj" in msg and "down_proj" in msg


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match="'model.norm' is a LlamaRMSNorm; LoRA supports Linear"):
        peftkit.get_peft_model(tiny_llama(), lora(target_modules=["norm"], layers_to_transform=None))


def test_model_type_without_defaults_asks_for_targets():
    with pytest.raises(ValueError, match="No default target_modules for model_type None.*conv1|head"):
        peftkit.get_peft_model(ConvNet(), peftkit.LoraConfig())


def test_safe_merge_refuses_nan_and_leaves_model_unmerged():
    model = peftkit.get_peft_model(tiny_llama(), lora(r=4))
    with torch.no_grad():  # a non-zero update everywhere, so a merge left behind would show in the logits
        for _, layer in model.base_model.adapter_layers():
            layer.lora_B["default"].weight.normal_()
    before = logits(model)
    bases = {n: layer.base_layer.weight.clone() for n, layer in model.base_model.adapter_layers()}
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    kept = layer.lora_B["default"].weight[0, 0].item()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"safe_merge: merging adapter 'default' into model.layers.1.self_attn.v_proj"
    ):
        model.merge_and_unload(safe_merge=True)
    assert not any(m.merged for _, m in model.base_model.adapter_layers())
    for name, layer_ in model.base_model.adapter_layers():  # every base weight restored bit for bit
        assert torch.equal(layer_.base_layer.weight, bases[name]), name
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = kept
    assert torch.equal(logits(model), before)


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    peftkit.get_peft_model(tiny_llama(), lora(r=4)).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError) as err:
        peftkit.PeftModel.from_pretrained(bigger, tmp_path)
    msg = str(err.value)
    assert "adapter_model.safetensors" in msg and re.search(
        r"module '[\w.]*layers\.\d\.self_attn\.[qv]_proj'", msg
    )
    m = re.search(r"has shape (\(\d+, \d+\)) but module .* expects (\(\d+, \d+\))", msg)
    assert m and m.group(1) != m.group(2), (
        msg
    )  # e.g. q_proj lora_A (4, 32) vs (4, 64), v_proj lora_B (16, 4) vs (32, 4)


def test_loading_onto_model_without_the_targeted_module(tmp_path):
    peftkit.get_peft_model(tiny_llama(), lora(r=4, target_modules=["gate_proj"])).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"Target modules \['gate_proj'\] not found .*GPT2LMHeadModel.*c_attn"
    ):
        peftkit.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_truncated_or_missing_weights_are_clear_errors(tmp_path):
    peftkit.get_peft_model(tiny_llama(), lora(r=4)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError,
        match=r"adapter_model.safetensors: (not a readable safetensors file|corrupt safetensors header).*truncated",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="No adapter weights in .*expected adapter_model.safetensors"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "does-not-exist")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/peftkit-pwned",))


def test_legacy_bin_is_loaded_without_running_pickle_code(tmp_path):
    model = peftkit.get_peft_model(tiny_llama(), lora(r=4))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model))
    torch.save({"x": _Evil()}, tmp_path / "adapter_model.bin")
    if os.path.exists("/tmp/peftkit-pwned"):
        os.unlink("/tmp/peftkit-pwned")
    with pytest.raises(ValueError, match="weights-only"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not os.path.exists("/tmp/peftkit-pwned")


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    good = peftkit.get_peft_model(tiny_llama(), lora(r=4))
    good.save_pretrained(tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    newer = peftkit.get_peft_model(tiny_llama(seed=5), lora(r=4))

    def disk_full(fd, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        newer.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {
        p.name: p.read_bytes() for p in tmp_path.iterdir()
    } == saved  # no temp files left, nothing changed
    torch.testing.assert_close(
        logits(peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)), logits(good)
    )


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.bin"
    io.atomic_write_bytes(target, b"old")
    io.atomic_write_bytes(target, b"new-content")
    assert target.read_bytes() == b"new-content" and os.listdir(tmp_path) == ["f.bin"]


def test_inference_mode_load_is_frozen_and_trainable_load_is_not(tmp_path):
    peftkit.get_peft_model(tiny_llama(), lora(r=4)).save_pretrained(tmp_path)
    frozen = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    trainable = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


@pytest.mark.parametrize("mixed", [False, True], ids=["PeftModel", "PeftMixedModel"])
def test_load_adapter_for_inference_switches_dropout_off_as_hf_peft_does(tmp_path, mixed):
    """An adapter added by `load_adapter` (not trainable) must not run its dropout: HF peft puts the whole
    model in eval mode then. Adapters trained with lora_dropout 0.05-0.1 are common (see real-adapters)."""
    import peft as hf_peft

    peftkit.get_peft_model(tiny_llama(), lora(r=4)).save_pretrained(tmp_path / "a")
    peftkit.get_peft_model(tiny_llama(), lora(r=4, lora_dropout=0.5)).save_pretrained(tmp_path / "b")
    inputs = token_inputs()
    outs = {}
    for lib in (peftkit, hf_peft):
        cls = lib.PeftMixedModel if mixed else lib.PeftModel
        model = cls.from_pretrained(tiny_llama(), tmp_path / "a").train()  # e.g. a notebook that trained
        model.load_adapter(tmp_path / "b", adapter_name="b")
        model.set_adapter("b")
        assert not any(m.training for m in model.modules()), lib.__name__
        first, second = logits(model, inputs), logits(model, inputs)
        torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout draws
        outs[lib.__name__] = first
        trainable = cls.from_pretrained(tiny_llama(), tmp_path / "a").train()
        trainable.load_adapter(tmp_path / "b", adapter_name="b", is_trainable=True)
        assert trainable.training, lib.__name__  # a trainable load leaves the mode alone
    torch.testing.assert_close(outs["peftkit"], outs["peft"], rtol=1e-5, atol=1e-5)


def test_generate_with_adapter_and_disabled():
    model = peftkit.get_peft_model(tiny_llama(), lora(r=4))
    ids = token_inputs()["input_ids"][:1]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    with model.disable_adapter():
        base_out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    expected = tiny_llama().generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(base_out, expected)


def test_modules_to_save_head_is_trained_saved_and_switched(tmp_path):
    from .models import tiny_bert_cls

    model = peftkit.get_peft_model(tiny_bert_cls(), peftkit.LoraConfig(task_type="SEQ_CLS", r=4))
    assert isinstance(model, peftkit.PeftModelForSequenceClassification)
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert sorted(head) == [
        "base_model.model.classifier.modules_to_save.default.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
    ]
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    loaded = peftkit.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model))
    merged = loaded.merge_and_unload()
    assert isinstance(merged.classifier, nn.Linear)
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-5)
