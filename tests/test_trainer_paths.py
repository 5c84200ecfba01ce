"""Every `transformers.Trainer` branch that treats HF peft models specially, on tokenized `datasets.Dataset`s.

transformers inspects an HF peft model's *base* (forward signature, class, class name); a peftkit model must
give Trainer the same answers (see `peftkit.integrations`). Where training runs, HF peft runs the same script
beside it and the logged losses and final adapters must agree to fp32 tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import peft as hf_peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import peftkit

from .models import tiny_bert_config, tiny_convnet, tiny_t5
from .test_trainer import VOCAB, adapter_tensors, logged, tiny_gpt2, tiny_llama, tiny_tokenizer

LIBS = {"peftkit": peftkit, "hf": hf_peft}
MAX_DIFFS: dict[str, float] = {}  # printed at the end of a run (-s) for the report


def bert_config() -> BertConfig:
    return tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls(bert_config())


# task type -> (base model factory, target modules or None for the defaults)
TASKS: dict[str | None, Any] = {
    None: tiny_gpt2,
    "CAUSAL_LM": tiny_llama,
    "SEQ_CLS": lambda: bert(BertForSequenceClassification),
    "TOKEN_CLS": lambda: bert(BertForTokenClassification),
    "QUESTION_ANS": lambda: bert(BertForQuestionAnswering),
    "FEATURE_EXTRACTION": lambda: bert(BertModel),
    "SEQ_2_SEQ_LM": tiny_t5,
}


def wrap(lib: Any, base: nn.Module, task_type: str | None, **config: Any) -> nn.Module:
    targets = ["query", "value"] if isinstance(base, (BertModel, *BERT_HEADS)) else None
    return lib.get_peft_model(
        base, lib.LoraConfig(r=4, target_modules=targets, task_type=task_type, **config)
    )


BERT_HEADS = (BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)


def args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ----- what Trainer reads off the model: one Trainer per library, no training ----------------------------------
ALL_COLUMNS = {
    "input_ids": [[3, 4, 5]],
    "attention_mask": [[1, 1, 1]],
    "token_type_ids": [[0, 0, 1]],
    "position_ids": [[0, 1, 2]],
    "labels": [[3, 4, 5]],
    "label": [1],
    "start_positions": [0],
    "end_positions": [1],
    "decoder_input_ids": [[3, 4]],
    "text": ["raw text"],
    "task_ids": [0],
}


def inspected(trainer: Trainer) -> dict[str, Any]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    name = model.base_model.model._get_name() if isinstance(model, hf_peft.PeftModel) else model._get_name()
    return {
        "label_names": trainer.label_names,
        "can_return_loss": trainer.can_return_loss,
        "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
        "loss_shifts_labels": trainer._loss_shifts_labels,
        "kept_columns": trainer._remove_unused_columns(datasets.Dataset.from_dict(ALL_COLUMNS)).column_names,
        "name_for_label_smoothing": name,
    }


@pytest.mark.parametrize("task_type", list(TASKS), ids=[str(t) for t in TASKS])
def test_trainer_inspects_a_peftkit_model_as_it_inspects_hf_peft(
    task_type: str | None, tmp_path: Path
) -> None:
    seen = {}
    for name, lib in LIBS.items():
        model = wrap(lib, TASKS[task_type](), task_type)
        seen[name] = inspected(Trainer(model=model, args=args(tmp_path)))
    assert seen["peftkit"] == seen["hf"]
    assert seen["peftkit"]["kept_columns"], "Trainer would drop every column"


def test_bert_sentence_pairs_and_packed_rows_keep_their_columns(tmp_path: Path) -> None:
    """token_type_ids (BERT pairs) and position_ids (packed rows) reach the model through Trainer."""
    for task_type, factory, column in (
        ("SEQ_CLS", TASKS["SEQ_CLS"], "token_type_ids"),
        ("TOKEN_CLS", TASKS["TOKEN_CLS"], "token_type_ids"),
        ("CAUSAL_LM", TASKS["CAUSAL_LM"], "position_ids"),
        (None, TASKS[None], "position_ids"),
    ):
        trainer = Trainer(model=wrap(peftkit, factory(), task_type), args=args(tmp_path))
        assert column in inspected(trainer)["kept_columns"], (task_type, column)


# ----- side by side with HF peft: gradient accumulation over padded rows of different lengths --------------------
def lm_dataset(n: int = 24) -> datasets.Dataset:
    """Rows of 3..11 tokens: padded batches with different numbers of label tokens per row, so the loss depends
    on `num_items_in_batch` being counted as transformers counts it for HF peft."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 12, (3 + (i * 5) % 9,), generator=g).tolist() for i in range(n)]
    return datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "text": ["x"] * n}
    )


VARIANTS: dict[str, dict[str, Any]] = {
    "grad_accum": {},
    "label_smoothing": {"label_smoothing_factor": 0.1},
    "neftune": {"neftune_noise_alpha": 5.0},
    "gradient_checkpointing": {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": True},
    },
}


def run_lm(lib: Any, tmp_path: Path, task_type: str | None, **overrides: Any) -> tuple[Trainer, nn.Module]:
    model = wrap(lib, tiny_gpt2(), task_type)
    data = lm_dataset()
    training = args(
        tmp_path,
        max_steps=3,
        gradient_accumulation_steps=4,
        eval_strategy="steps",
        eval_steps=3,
        **overrides,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        eval_dataset=data.select(range(6)),
        data_collator=DataCollatorForLanguageModeling(tiny_tokenizer(), mlm=False),
    )
    trainer.train()
    return trainer, model


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("variant", "task_type"), [("grad_accum", "CAUSAL_LM")] + [(v, None) for v in VARIANTS]
)
def test_training_matches_hf_peft_side_by_side(variant: str, task_type: str | None, tmp_path: Path) -> None:
    runs = {name: run_lm(lib, tmp_path / name, task_type, **VARIANTS[variant]) for name, lib in LIBS.items()}
    (ours, our_model), (theirs, their_model) = runs["peftkit"], runs["hf"]
    assert ours.model_accepts_loss_kwargs and theirs.model_accepts_loss_kwargs
    for key in ("loss", "grad_norm", "eval_loss"):
        got, expected = logged(ours, key), logged(theirs, key)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), key
        MAX_DIFFS[f"{variant}/{task_type}/{key}"] = max_diff(got, expected)
    a, b = adapter_tensors(our_model), adapter_tensors(their_model)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    MAX_DIFFS[f"{variant}/{task_type}/adapter"] = max((a[k] - b[k]).abs().max().item() for k in a)
    assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)
    # NEFTune's hook is gone after training
    hooks = our_model.get_input_embeddings()._forward_hooks.values()
    assert not [h for h in hooks if "neftune" in getattr(h, "__name__", "")], "NEFTune left its hook"


def test_label_smoothing_and_neftune_change_the_run(tmp_path: Path) -> None:
    """The side-by-side runs above are not vacuous: each option changes peftkit's loss."""
    plain = logged(run_lm(peftkit, tmp_path / "plain", None)[0], "loss")
    for variant in ("label_smoothing", "neftune"):
        changed = logged(run_lm(peftkit, tmp_path / variant, None, **VARIANTS[variant])[0], "loss")
        assert max_diff(plain, changed) > 1e-3, variant


def test_print_max_diffs() -> None:
    """Run with -s to see the largest peftkit - HF peft differences of the side-by-side runs."""
    for key, value in sorted(MAX_DIFFS.items()):
        print(f"max |peftkit - hf| {key}: {value:.3g}")


# ----- evaluation and prediction, classification on sentence pairs ------------------------------------------------
def pairs_dataset(n: int = 8) -> datasets.Dataset:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, VOCAB, (4 + i % 3,), generator=g).tolist() for i in range(n)]
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(r) for r in ids],
            "token_type_ids": [[0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2) for r in ids],
            "labels": [i % 3 for i in range(n)],
            "sentence": ["a b"] * n,
        }
    )


@pytest.mark.parametrize("prediction_loss_only", [True, False])
def test_evaluate_and_predict_sentence_pairs_match_hf_peft(
    prediction_loss_only: bool, tmp_path: Path
) -> None:
    data = pairs_dataset()
    results, trainers = {}, {}
    for name, lib in LIBS.items():
        model = wrap(lib, TASKS["SEQ_CLS"](), "SEQ_CLS")
        trainer = Trainer(
            model=model,
            args=args(tmp_path / name, max_steps=2, prediction_loss_only=prediction_loss_only),
            train_dataset=data,
            data_collator=DataCollatorWithPadding(tiny_tokenizer()),
        )
        trainer.train()
        results[name], trainers[name] = trainer.predict(data), trainer
    ours, theirs = results["peftkit"], results["hf"]
    assert ours.metrics["test_loss"] == pytest.approx(theirs.metrics["test_loss"], rel=1e-5)
    if prediction_loss_only:
        assert ours.predictions is None and theirs.predictions is None
    else:
        torch.testing.assert_close(torch.as_tensor(ours.predictions), torch.as_tensor(theirs.predictions))
        assert (ours.label_ids == theirs.label_ids).all()
    # token_type_ids reached peftkit's model: predicting without them gives other logits
    if not prediction_loss_only:
        without = trainers["peftkit"].predict(data.remove_columns("token_type_ids")).predictions
        assert abs(without - ours.predictions).max() > 1e-6


# ----- checkpoints: load_best_model_at_end, save_only_model, save_total_limit, resume --------------------------
def checkpoint_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    return args(
        output_dir, max_steps=4, save_strategy="steps", save_steps=1, eval_strategy="steps", **overrides
    )


def lm_trainer(model: nn.Module, training: TrainingArguments) -> Trainer:
    data = lm_dataset(16)
    return Trainer(
        model=model,
        args=training,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        data_collator=DataCollatorForLanguageModeling(tiny_tokenizer(), mlm=False),
    )


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_load_best_model_at_end(adapter_name: str, tmp_path: Path) -> None:
    config = peftkit.LoraConfig(r=4, task_type="CAUSAL_LM")
    model = peftkit.get_peft_model(tiny_gpt2(), config, adapter_name=adapter_name)
    training = checkpoint_args(
        tmp_path,
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )  # "best" = the highest eval loss: the first checkpoint, so loading it visibly changes the adapter
    trainer = lm_trainer(model, training)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-1", best
    folder = best if adapter_name == "default" else best / adapter_name
    assert_same(adapter_tensors(model), load_file(folder / "adapter_model.safetensors"))
    last = tmp_path / "checkpoint-4"
    last_folder = last if adapter_name == "default" else last / adapter_name
    assert not all(
        torch.equal(v, load_file(last_folder / "adapter_model.safetensors")[k])
        for k, v in adapter_tensors(model).items()
    )


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_save_only_model_and_save_total_limit(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(r=4))
    training = checkpoint_args(tmp_path, eval_steps=4, save_only_model=True, save_total_limit=2)
    lm_trainer(model, training).train()
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == ["checkpoint-3", "checkpoint-4"]
    for name in kept:
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert "optimizer.pt" not in files and "scheduler.pt" not in files
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert "config.json" not in files and "pytorch_model.bin" not in files


def test_resume_with_a_non_default_active_adapter(tmp_path: Path) -> None:
    """The active adapter 'other' resumes from other/adapter_model.safetensors; 'default' is left alone."""

    def two_adapters() -> nn.Module:
        model = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(r=4))
        model.add_adapter("other", peftkit.LoraConfig(r=4, init_lora_weights=False))
        model.set_adapter("other")
        return model

    first = two_adapters()
    lm_trainer(first, checkpoint_args(tmp_path / "a", eval_steps=4)).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved_other = load_file(checkpoint / "other" / "adapter_model.safetensors")
    saved_default = load_file(checkpoint / "adapter_model.safetensors")

    second = two_adapters()
    default_before = adapter_tensors_of(second, "default")
    at_start: dict[str, torch.Tensor] = {}

    class Snapshot(__import__("transformers").TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            at_start.update(at_start or adapter_tensors_of(second, "other"))

    trainer = lm_trainer(second, checkpoint_args(tmp_path / "b", eval_steps=4))
    trainer.add_callback(Snapshot())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    assert_same(at_start, saved_other)
    assert any(not torch.equal(saved_other[k], saved_default[k]) for k in saved_other)
    assert_same(adapter_tensors_of(second, "default"), default_before)
    torch.testing.assert_close(adapter_tensors_of(second, "other"), adapter_tensors_of(first, "other"))


def adapter_tensors_of(model: Any, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict(name).items()}


# ----- arguments the wrapper cannot honour are errors ----------------------------------------------------------
def test_adapter_names_is_honoured_and_task_ids_refused() -> None:
    """`adapter_names` runs each row with its adapter (see tests/test_mixed_batch.py), also when `forward` is
    called directly; `task_ids` (multitask prompt tuning) is refused, never dropped."""
    model = peftkit.get_peft_model(
        tiny_gpt2(), peftkit.LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False)
    ).eval()
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        for call in (model, model.forward):
            mixed = call(input_ids=ids, adapter_names=["default", "__base__"]).logits
            torch.testing.assert_close(mixed[0], adapted[0])
            torch.testing.assert_close(mixed[1], base[1])
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=ids, task_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, adapter_names=["default", "nope"])
    model(input_ids=ids, adapter_names=None)  # the reference's default is accepted


def test_unknown_keyword_reaches_a_custom_model_and_fails_there() -> None:
    model = peftkit.get_peft_model(tiny_convnet(), peftkit.LoraConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(TypeError, match="bogus"):
        model(torch.randn(1, 3, 4, 4), bogus=1)


# ----- the per-base wrapper class ------------------------------------------------------------------------------
def test_specialised_wrapper_keeps_its_name_copies_and_pickles() -> None:
    import copy
    import inspect

    model = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(r=4, task_type="CAUSAL_LM"))
    assert type(model).__name__ == "PeftModelForCausalLM" and isinstance(model, peftkit.PeftModelForCausalLM)
    assert repr(model).startswith("PeftModelForCausalLM(")
    assert model._get_name() == "GPT2LMHeadModel"  # what label smoothing asks
    assert "token_type_ids" in inspect.signature(model.forward).parameters
    assert "token_type_ids" in inspect.signature(type(model).forward).parameters
    ids = torch.tensor([[3, 4, 5]])
    expected = model(input_ids=ids).logits
    for clone in (copy.deepcopy(model), torch_roundtrip(model)):
        assert type(clone) is type(model)
        torch.testing.assert_close(clone(input_ids=ids).logits, expected)


def torch_roundtrip(model: nn.Module) -> nn.Module:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_seq2seq_trainer_predict_with_generate_matches_hf_peft(tmp_path: Path) -> None:
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    data = datasets.Dataset.from_dict(
        {
            "input_ids": [[3, 4, 5], [6, 7]] * 2,
            "attention_mask": [[1, 1, 1], [1, 1]] * 2,
            "labels": [[8, 9], [10, 11, 12]] * 2,
        }
    )
    results = {}
    for name, lib in LIBS.items():
        model = wrap(lib, TASKS["SEQ_2_SEQ_LM"](), "SEQ_2_SEQ_LM")
        training = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
            predict_with_generate=True,
            generation_max_length=5,
        )
        trainer = Seq2SeqTrainer(
            model=model,
            args=training,
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(tiny_tokenizer(), model=model),
        )
        trainer.train()
        results[name] = (logged(trainer, "loss"), trainer.predict(data))
    (our_loss, ours), (their_loss, theirs) = results["peftkit"], results["hf"]
    assert our_loss == pytest.approx(their_loss, rel=1e-5)
    assert ours.metrics["test_loss"] == pytest.approx(theirs.metrics["test_loss"], rel=1e-5)
    assert (ours.predictions == theirs.predictions).all()


def test_trainer_accepts_a_quantized_base_with_peftkit_adapters(tmp_path: Path) -> None:
    """QLoRA: Trainer refuses a purely quantized model, and tells one with adapters apart by HF peft's class or
    `_hf_peft_config_loaded`. (The quantizer is faked: no bitsandbytes on CPU.)"""
    from types import SimpleNamespace

    def quantized() -> nn.Module:
        base = tiny_gpt2()
        base.is_quantized = True
        base.hf_quantizer = SimpleNamespace(
            is_trainable=True,
            is_qat_trainable=False,
            quantization_config=SimpleNamespace(quant_method="fake"),
        )
        return base

    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=quantized(), args=args(tmp_path))
    for lib in LIBS.values():
        Trainer(model=wrap(lib, quantized(), "CAUSAL_LM"), args=args(tmp_path))
