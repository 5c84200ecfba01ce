"""Options and wrappers no other test reached, each checked against HF peft: `exclude_modules`,
`init_lora_weights="pissa_niter_N"`, the token-classification / question-answering / feature-extraction
wrappers, `save_pretrained(selected_adapters=...)` and `save_embedding_layers`."""

from __future__ import annotations

import os

import peft as hf_peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForQuestionAnswering, BertForTokenClassification, BertModel

import peftkit

from .models import tiny_bert, tiny_llama, token_inputs

LIBS = (hf_peft, peftkit)


def _lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lora_A" in n}


def test_exclude_modules_list_and_regex_match_hf():
    for exclude in (["model.layers.0.self_attn.q_proj"], r".*layers\.1\..*", ["v_proj"]):
        names = [
            _lora_names(
                lib.get_peft_model(
                    tiny_llama(),
                    lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=exclude),
                )
            )
            for lib in LIBS
        ]
        assert names[0] == names[1], exclude
        assert names[1] and len(names[1]) < 8, (exclude, names[1])  # something excluded, something kept


def test_pissa_niter_keeps_the_output_and_matches_hf():
    inputs = token_inputs()
    original = tiny_llama()(**inputs).logits
    states, outs = [], []
    for lib in LIBS:
        torch.manual_seed(5)  # svd_lowrank draws a random start
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, init_lora_weights="pissa_niter_4"))
        with torch.no_grad():
            outs.append(model(**inputs).logits)
            base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
            assert not torch.allclose(base, tiny_llama().model.layers[0].self_attn.q_proj.weight)  # residual
        states.append(model.state_dict())
    for out in outs:  # PiSSA: residual base + adapter == the original model at init
        torch.testing.assert_close(out, original, atol=1e-4, rtol=1e-4)
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], atol=1e-4, rtol=1e-3, msg=k)


def _tiny_bert(cls, seed: int = 0):
    return tiny_bert(cls, seed, num_labels=2)  # question answering: start and end


def _first_tensor(out) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return out[key]
    raise AssertionError(f"no comparable tensor in {type(out).__name__}")


@pytest.mark.parametrize(
    "task, model_cls, wrapper",
    [
        ("TOKEN_CLS", BertForTokenClassification, "PeftModelForTokenClassification"),
        ("QUESTION_ANS", BertForQuestionAnswering, "PeftModelForQuestionAnswering"),
        ("FEATURE_EXTRACTION", BertModel, "PeftModelForFeatureExtraction"),
    ],
)
@pytest.mark.parametrize("direction", ["peftkit->hf", "hf->peftkit"])
def test_task_wrappers_train_the_same_tensors_and_interoperate(task, model_cls, wrapper, direction, tmp_path):
    src, dst = LIBS[::-1] if direction == "peftkit->hf" else LIBS
    config = {"r": 4, "target_modules": ["query", "value"], "init_lora_weights": False}
    models = {
        lib: lib.get_peft_model(_tiny_bert(model_cls), lib.LoraConfig(task_type=task, **config))
        for lib in LIBS
    }
    assert type(models[peftkit]).__name__ == type(models[hf_peft]).__name__ == wrapper
    trainable = [{n for n, p in m.named_parameters() if p.requires_grad} for m in models.values()]
    assert trainable[0] == trainable[1]
    model = models[src]
    with torch.no_grad():  # a trained head too (token classification's classifier, QA's qa_outputs)
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad and "lora_" not in n:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = dst.PeftModel.from_pretrained(_tiny_bert(model_cls), tmp_path)
    assert type(loaded).__name__ == wrapper
    inputs = token_inputs()
    with torch.no_grad():
        got, want = _first_tensor(loaded(**inputs)), _first_tensor(model.eval()(**inputs))
        base = _first_tensor(_tiny_bert(model_cls)(**inputs))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)


def _two_adapters(lib):
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("second", lib.LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False))
    return model


def _files(root) -> list[str]:
    out = []
    for folder, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, f), root) for f in files if f != "README.md"]
    return sorted(out)


@pytest.mark.parametrize("selected", [None, ["second"], ["default"]])
def test_selected_adapters_writes_the_same_files_as_hf(selected, tmp_path):
    for lib in LIBS:
        _two_adapters(lib).save_pretrained(tmp_path / lib.__name__, selected_adapters=selected)
    assert _files(tmp_path / "peftkit") == _files(tmp_path / "peft")
    expected = {"default": "adapter_model.safetensors", "second": "second/adapter_model.safetensors"}
    assert {f for f in _files(tmp_path / "peftkit") if f.endswith(".safetensors")} == {
        expected[n] for n in (selected or expected)
    }
    if selected == ["second"]:  # the second adapter's own tensors, loadable alone
        tensors = load_file(tmp_path / "peftkit" / "second" / "adapter_model.safetensors")
        assert tensors and all("k_proj" in k for k in tensors)


@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["q_proj"]])
def test_save_embedding_layers_saves_the_same_keys_as_hf(save_embedding_layers, targets, tmp_path):
    keys = []
    for lib in LIBS:
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=targets))
        folder = tmp_path / lib.__name__
        model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
        keys.append(set(load_file(folder / "adapter_model.safetensors")))
    assert keys[0] == keys[1]
    has_base_embedding = any(k.endswith("embed_tokens.base_layer.weight") for k in keys[1])
    assert has_base_embedding == ("embed_tokens" in targets and save_embedding_layers is not False)
