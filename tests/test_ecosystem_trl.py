"""TRL's SFTTrainer and DPOTrainer given a peftkit model, side by side with the same script on HF peft.

TRL asks `accelerate.utils.is_peft_model` (an `isinstance` with HF peft's class), so it treats a peftkit model as
a plain transformers model: SFTTrainer patches its fused LM head onto the model passed (peftkit moves the patch
to the base model, where TRL puts it for HF peft: `peftkit.integrations.redirect_forward_patch`), and
DPOTrainer copies the model as its reference unless `precompute_ref_log_probs=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import peft as hf_peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import peftkit

from .test_trainer import adapter_tensors, logged, tiny_gpt2, tiny_tokenizer

LIBS = {"peftkit": peftkit, "hf": hf_peft}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }} [EOS]{% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
PROMPTS = ["say hello", "name three colours", "give two animals", "write a response"]
ANSWERS = [" world", " red green blue", " cat dog", " hello"]


def tokenizer() -> Any:
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def prompt_completion() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": PROMPTS, "completion": ANSWERS})


def messages() -> datasets.Dataset:
    rows = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}]
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    return datasets.Dataset.from_dict({"messages": rows})


def common(output_dir: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        save_steps=2,
    )


def sft(lib: Any, data: datasets.Dataset, output_dir: Path, **config: Any) -> tuple[SFTTrainer, Any]:
    model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(r=4, task_type="CAUSAL_LM"))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**common(output_dir), **config),
        train_dataset=data,
        processing_class=tokenizer(),
    )
    trainer.train()
    return trainer, model


@pytest.mark.parametrize(
    ("dataset", "config"),
    [(prompt_completion, {}), (messages, {"assistant_only_loss": True})],
    ids=["prompt_completion", "messages_assistant_only"],
)
def test_sft_trainer_matches_hf_peft(dataset: Any, config: dict[str, Any], tmp_path: Path) -> None:
    runs = {name: sft(lib, dataset(), tmp_path / name, **config) for name, lib in LIBS.items()}
    (ours, model), (theirs, reference) = runs["peftkit"], runs["hf"]
    assert logged(ours, "loss") == pytest.approx(logged(theirs, "loss"), rel=1e-5)
    assert "entropy" in ours.state.log_history[0], "TRL's fused LM head did not run"
    a, b = adapter_tensors(model), adapter_tensors(reference)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # only the adapter trained; the checkpoint holds only the adapter
    base = tiny_gpt2().state_dict()
    for name, param in model.get_base_model().named_parameters():
        if ".lora_" not in name:
            assert not param.requires_grad
            assert torch.equal(param.detach(), base[name.replace(".base_layer", "")]), name
    checkpoint = tmp_path / "peftkit" / "checkpoint-2"
    assert sorted(load_file(checkpoint / "adapter_model.safetensors")) == sorted(a)
    assert not (checkpoint / "config.json").exists() and not (checkpoint / "pytorch_model.bin").exists()
    # TRL's patch landed on the transformers model, not on the wrapper (accelerate's fp32 wrapper stays there)
    assert code_name(vars(model.get_base_model()).get("forward")) == "_fused_forward"
    assert code_name(vars(model).get("forward")) != "_fused_forward"


def code_name(method: Any) -> str | None:
    function = getattr(method, "__func__", None)
    return getattr(getattr(function, "__code__", None), "co_name", None)


def test_sft_completion_only_loss_is_taken_on_the_completion(tmp_path: Path) -> None:
    only = logged(sft(peftkit, prompt_completion(), tmp_path / "only")[0], "loss")
    full = logged(sft(peftkit, prompt_completion(), tmp_path / "full", completion_only_loss=False)[0], "loss")
    assert abs(only[0] - full[0]) > 1e-3


def preferences() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": ANSWERS, "rejected": ANSWERS[::-1]})


def test_dpo_trainer_with_precomputed_reference_matches_hf_peft(tmp_path: Path) -> None:
    """`precompute_ref_log_probs=True` keeps TRL from copying the peftkit model as its reference model."""
    runs = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(r=4, task_type="CAUSAL_LM"))
        config = DPOConfig(**common(tmp_path / name), precompute_ref_log_probs=True)
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=preferences(), processing_class=tokenizer()
        )
        assert trainer.ref_model is None
        trainer.train()
        runs[name] = (logged(trainer, "loss"), adapter_tensors(model))
    assert runs["peftkit"][0] == pytest.approx(runs["hf"][0], rel=1e-5)
    for key, value in runs["hf"][1].items():
        torch.testing.assert_close(runs["peftkit"][1][key], value, rtol=1e-5, atol=1e-6)


def test_dpo_trainer_without_precompute_loads_a_second_base_model(tmp_path: Path) -> None:
    """Without `precompute_ref_log_probs`, TRL does not see an HF peft model, so instead of disabling the adapter
    it loads the reference model again from `config._name_or_path` (a second full copy; the base without
    the adapter)."""
    tiny_gpt2().save_pretrained(tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, task_type="CAUSAL_LM"))
    config = DPOConfig(**common(tmp_path / "run"))
    trainer = DPOTrainer(model=model, args=config, train_dataset=preferences(), processing_class=tokenizer())
    assert isinstance(trainer.ref_model, GPT2LMHeadModel)
    assert not isinstance(trainer.ref_model, peftkit.PeftModel)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) for v in logged(trainer, "loss"))


def test_fused_lm_head_patch_goes_to_the_base_model_also_after_accelerate_wrapped_forward() -> None:
    """A second trainer on the same model (a notebook cell run twice) finds accelerate's fp32 wrapper on the
    peftkit model's `forward`; TRL's patch must still land on the base model."""
    import types

    from trl.trainer.utils import add_fused_lm_head

    model = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(r=4, task_type="CAUSAL_LM"))
    ids = torch.tensor([[3, 4, 5, 6]])
    expected = model(input_ids=ids).logits
    for _ in range(2):
        add_fused_lm_head(model)
        assert code_name(vars(model.get_base_model())["forward"]) == "_fused_forward"
        accelerate_like = wrap_function(model.forward.__func__)
        model.forward = types.MethodType(accelerate_like, model)  # stays on the wrapper
        assert vars(model)["forward"].__func__ is accelerate_like
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert fused.log_probs.shape == (1, 3)
    torch.testing.assert_close(fused.loss, model(input_ids=ids, labels=ids).loss)


def wrap_function(inner: Any) -> Any:
    """Like accelerate's `convert_outputs_to_fp32(model.forward.__func__)`."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return inner(self, *args, **kwargs)

    return forward
