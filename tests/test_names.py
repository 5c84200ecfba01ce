"""Names user code reads must equal HF peft's: state_dict() / named_parameters() keys of every conformance
case, `config.target_modules` a set after injection (a sorted list in the file), DoRA's magnitude keys."""

from __future__ import annotations

import json

import peft as hf_peft
import pytest
from safetensors.torch import load_file

import peftkit

from .cases import CASES, Case
from .test_conformance import build


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_state_dict_and_parameter_names_equal_hf(case: Case):
    ours, theirs = build(peftkit, case), build(hf_peft, case)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    mine, hf = ours.peft_config["default"], theirs.peft_config["default"]
    if isinstance(getattr(hf, "target_modules", None), set):
        assert isinstance(mine.target_modules, set)
        if not any("." in t for t in hf.target_modules):  # HF spells "all-linear" out as full module names
            assert mine.target_modules == hf.target_modules


def test_target_modules_is_a_set_after_injection_and_a_list_on_disk(tmp_path):
    from .models import tiny_llama

    config = peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = peftkit.get_peft_model(tiny_llama(), config)
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    assert config.target_modules == ["q_proj", "v_proj"]  # the caller's config is not mutated
    model.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert on_disk == ["q_proj", "v_proj"]


def test_dora_magnitude_keys(tmp_path):
    from .models import tiny_llama

    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, use_dora=True))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
    assert key in dict(model.named_parameters())
    model.save_pretrained(tmp_path)
    file_keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in file_keys


def test_prompt_learning_layout_is_hf_peft_s():
    from .models import tiny_llama

    model = peftkit.get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(num_virtual_tokens=3))
    keys = set(model.state_dict())
    assert "prompt_encoder.default.embedding.weight" in keys and "word_embeddings.weight" in keys
    assert all(k.startswith(("base_model.", "prompt_encoder.", "word_embeddings.")) for k in keys)
    model.eval()
    assert not model.base_model.training  # the tuner that runs the prompt follows train()/eval()
