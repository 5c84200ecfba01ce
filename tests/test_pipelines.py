"""`transformers.pipeline(task, model=<peftkit model>)`: the pipeline runs the model with its adapter.

Pipelines accept HF peft's wrapper classes by name (`SUPPORTED_PEFT_TASKS`) and ask `model.can_generate()`;
peftkit's wrappers carry the same names and answer `can_generate` from the base model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

import peftkit

from .test_trainer import tiny_gpt2, tiny_tokenizer
from .test_trainer_paths import TASKS, wrap

PROMPT = "say hello world"


def with_random_adapter(model: Any) -> Any:
    """B = 0 at init would make the adapter a no-op; give it weight so "with the adapter" is observable."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.5)
    return model.eval()


def test_text_generation_pipeline_generates_with_the_adapter() -> None:
    tok = tiny_tokenizer()
    model = with_random_adapter(
        peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(r=4, task_type="CAUSAL_LM"))
    )
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    out = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    inputs = tok(PROMPT, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0]
    assert list(out) == expected.tolist()
    with model.disable_adapter():
        base = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0]
    assert not torch.equal(base, expected), "the adapter should change the generated tokens"


@pytest.mark.parametrize(
    ("task", "task_type"), [("text-classification", "SEQ_CLS"), ("token-classification", "TOKEN_CLS")]
)
def test_classification_pipelines_use_the_task_wrappers(task: str, task_type: str) -> None:
    tok = tiny_tokenizer()
    model = with_random_adapter(wrap(peftkit, TASKS[task_type](), task_type))
    pipe = transformers.pipeline(task, model=model, tokenizer=tok)
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits.softmax(-1)[0]
    if task == "text-classification":
        result = pipe(PROMPT)[0]
        assert result["score"] == pytest.approx(probs.max().item(), rel=1e-5)
        assert result["label"] == f"LABEL_{probs.argmax().item()}"
    else:
        result = pipe(PROMPT)
        assert [r["word"] for r in result] == PROMPT.split()
        for row, entity in zip(probs, result, strict=True):
            assert entity["score"] == pytest.approx(row.max().item(), rel=1e-5)
            assert entity["entity"] == f"LABEL_{row.argmax().item()}"
