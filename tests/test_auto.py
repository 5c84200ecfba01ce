"""`AutoPeftModel*` side by side with HF peft: the same adapter folder (written by HF peft) loads base model +
adapter in both libraries with equal outputs, for every task class; wrong classes fail in both; a tokenizer
saved with the adapter resizes the embeddings in both."""

from __future__ import annotations

import warnings

import peft as hf
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import peftkit as pk

from .models import VOCAB, seq2seq_inputs, tiny_bert_config, tiny_llama, tiny_t5, token_inputs

ATOL = 1e-6
# task -> (Auto class of the base, how to build it, inputs, auto class name, LoRA targets)
TASKS = {
    "CAUSAL_LM": (
        AutoModelForCausalLM,
        tiny_llama,
        token_inputs,
        "AutoPeftModelForCausalLM",
        ["q_proj", "v_proj"],
    ),
    "SEQ_2_SEQ_LM": (AutoModelForSeq2SeqLM, tiny_t5, seq2seq_inputs, "AutoPeftModelForSeq2SeqLM", ["q", "v"]),
    "SEQ_CLS": (
        AutoModelForSequenceClassification,
        None,
        token_inputs,
        "AutoPeftModelForSequenceClassification",
        None,
    ),
    "TOKEN_CLS": (
        AutoModelForTokenClassification,
        None,
        token_inputs,
        "AutoPeftModelForTokenClassification",
        None,
    ),
    "QUESTION_ANS": (
        AutoModelForQuestionAnswering,
        None,
        token_inputs,
        "AutoPeftModelForQuestionAnswering",
        None,
    ),
    "FEATURE_EXTRACTION": (AutoModel, None, token_inputs, "AutoPeftModelForFeatureExtraction", None),
}


def _base(task: str):
    auto, build, *_ = TASKS[task]
    if build is not None:
        return build()
    torch.manual_seed(0)
    labels = 2 if task == "QUESTION_ANS" else 3  # a span head has start and end logits
    return auto.from_config(tiny_bert_config(num_labels=labels)).eval()


def _first_tensor(out) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output tensor in {type(out).__name__}")


def _adapter_folder(tmp_path, task: str | None, base_task: str = "CAUSAL_LM"):
    """Save a tiny base model and an HF peft adapter for it (noised, so it changes the output)."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _base(base_task).save_pretrained(base_dir)
    model = TASKS[base_task][0].from_pretrained(base_dir)
    targets = TASKS[base_task][4] or ["query", "value"]
    peft_model = hf.get_peft_model(model, hf.LoraConfig(r=4, target_modules=targets, task_type=task))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(adapter_dir)
    return adapter_dir


def _load(lib, cls_name: str, folder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return getattr(lib, cls_name).from_pretrained(str(folder), **kwargs)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_auto_classes_load_base_and_adapter_like_the_reference(task: str, tmp_path) -> None:
    folder = _adapter_folder(tmp_path, task, task)
    cls_name, make_inputs = TASKS[task][3], TASKS[task][2]
    ref, ours = _load(hf, cls_name, folder), _load(pk, cls_name, folder)
    assert type(ours).__name__ == type(ref).__name__
    assert type(ours.get_base_model()).__name__ == type(ref.get_base_model()).__name__
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference by default
    x = make_inputs()
    with torch.no_grad():
        got, want = _first_tensor(ours(**x)), _first_tensor(ref(**x))
        assert torch.allclose(got, want, atol=ATOL)
        with ours.disable_adapter():
            assert not torch.allclose(got, _first_tensor(ours(**x)), atol=1e-4)  # the adapter matters
    trainable = _load(pk, cls_name, folder, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_auto_peft_model_uses_auto_mapping_for_adapters_without_task(tmp_path) -> None:
    folder = _adapter_folder(tmp_path, None)
    ref, ours = _load(hf, "AutoPeftModel", folder), _load(pk, "AutoPeftModel", folder)
    assert type(ours).__name__ == type(ref).__name__ == "PeftModel"
    assert type(ours.get_base_model()).__name__ == "LlamaForCausalLM"
    x = token_inputs()
    with torch.no_grad():
        assert torch.allclose(ours(**x).logits, ref(**x).logits, atol=ATOL)
    with pytest.raises(ValueError, match="allowlist"):
        _load(pk, "AutoPeftModel", folder, import_allowlist=["diffusers"])


@pytest.mark.parametrize("lib", [hf, pk], ids=["peft", "peftkit"])
def test_wrong_auto_class_is_refused(lib, tmp_path) -> None:
    folder = _adapter_folder(tmp_path, "CAUSAL_LM")
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        _load(lib, "AutoPeftModel", folder)
    with pytest.raises(ValueError, match="PeftModelForCausalLM"):
        _load(lib, "AutoPeftModelForSequenceClassification", folder)
    with pytest.raises(OSError):
        lib.AutoPeftModelForCausalLM()


def test_tokenizer_in_adapter_folder_resizes_embeddings_like_the_reference(tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = _adapter_folder(tmp_path, "CAUSAL_LM")
    vocab = {f"t{i}": i for i in range(VOCAB + 5)}  # 5 tokens more than the base model's embeddings
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.save_pretrained(folder)
    ref = _load(hf, "AutoPeftModelForCausalLM", folder)
    ours = _load(pk, "AutoPeftModelForCausalLM", folder)
    assert (
        ours.get_input_embeddings().weight.shape[0] == ref.get_input_embeddings().weight.shape[0] == VOCAB + 5
    )
    x = token_inputs()
    with torch.no_grad():
        got, want = ours(**x).logits, ref(**x).logits
    assert got.shape == want.shape
    assert torch.allclose(got[..., :VOCAB], want[..., :VOCAB], atol=ATOL)


def test_base_model_kwargs_reach_the_base_model(tmp_path) -> None:
    folder = _adapter_folder(tmp_path, "CAUSAL_LM")
    ref = _load(hf, "AutoPeftModelForCausalLM", folder, dtype=torch.bfloat16)
    ours = _load(pk, "AutoPeftModelForCausalLM", folder, dtype=torch.bfloat16)
    assert ours.base_model_torch_dtype == ref.base_model_torch_dtype == torch.bfloat16
    assert sorted({str(p.dtype) for n, p in ours.named_parameters() if "lora_" in n}) == sorted(
        {str(p.dtype) for n, p in ref.named_parameters() if "lora_" in n}
    )
    x = token_inputs()
    with torch.no_grad():
        assert torch.allclose(ours(**x).logits.float(), ref(**x).logits.float(), atol=1e-2)
