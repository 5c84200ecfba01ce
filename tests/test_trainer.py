"""The seed's flow through a plain `transformers.Trainer`, on a tiny GPT-2 and a tiny Llama.

`get_peft_model` -> `Trainer(...).train()` with `save_steps` -> adapter-only checkpoints that HF peft loads ->
`resume_from_checkpoint` continues to the same step count and the same adapter. Plus gradient checkpointing
and `print_trainable_parameters`, both against HF peft. Models are built from configs with a fixed seed and
no dropout, so two runs (or the two libraries) take bit-identical steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft as hf_peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import peftkit

VOCAB = 128
SEQ = 12
MAX_STEPS = 6
SAVE_STEPS = 2


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


ARCHS: dict[str, Callable[[], nn.Module]] = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def attention_of_first_block(model: nn.Module) -> nn.Module:
    """A module called inside the first decoder block: transformers checkpoints a block's `forward` (not its
    `__call__`), so hooks on the block itself do not see the recompute, but hooks on its children do."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.transformer.h[0].attn if hasattr(base, "transformer") else base.model.layers[0].self_attn


class TokenDataset(torch.utils.data.Dataset):
    """Sequences over the first 8 token ids only: a distribution a LoRA learns within a few steps."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 8, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


DATASET = TokenDataset()
FIXED_BATCH = {k: torch.stack([DATASET[i][k] for i in range(8)]) for k in DATASET[0]}


def lora_config(lib: Any = peftkit) -> Any:
    return lib.LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM")


def training_args(output_dir: Path | str, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter under its file keys, detached copies (works for both libraries)."""
    if isinstance(model, peftkit.PeftModel):
        state = model.get_adapter_state_dict()
    else:
        state = hf_peft.get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items()}


def eval_loss(model: nn.Module) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**FIXED_BATCH).loss.item()
    model.train(was_training)
    return loss


def eval_logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=FIXED_BATCH["input_ids"], attention_mask=FIXED_BATCH["attention_mask"]).logits


def logged(trainer: Trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def assert_same_tensors(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = True
) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        if exact:
            assert torch.equal(got[key], expected[key]), key
        else:
            torch.testing.assert_close(got[key], expected[key], msg=key)


class AdapterSnapshots(TrainerCallback):
    """Records the adapter at the first step the trainer runs and right after each checkpoint is written."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.first_step: tuple[int, dict[str, torch.Tensor]] | None = None
        self.at_save: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first_step is None:
            self.first_step = (state.global_step, adapter_tensors(self.model))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.at_save[state.global_step] = adapter_tensors(self.model)


@contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Collect the messages transformers logs at WARNING and above (its root logger does not propagate)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger("transformers")
    old_level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        transformers.logging.set_verbosity(old_level)


# ----- one training run per architecture, shared by the tests that inspect it -------------------------------------
@dataclass
class Run:
    arch: str
    model: nn.Module
    trainer: Trainer
    output_dir: Path
    final_dir: Path
    params_before: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float
    snapshots: AdapterSnapshots
    base_bytes: int


@pytest.fixture(scope="module", params=sorted(ARCHS))
def run_a(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    arch = request.param
    base = ARCHS[arch]()
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    model = peftkit.get_peft_model(base, lora_config())
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = eval_loss(model)
    output_dir = tmp_path_factory.mktemp(f"run_a_{arch}")
    snapshots = AdapterSnapshots(model)
    trainer = Trainer(
        model=model, args=training_args(output_dir), train_dataset=DATASET, callbacks=[snapshots]
    )
    trainer.train()
    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))
    return Run(
        arch,
        model,
        trainer,
        output_dir,
        final_dir,
        params_before,
        loss_before,
        eval_loss(model),
        snapshots,
        base_bytes,
    )


def test_training_lowers_the_loss(run_a: Run) -> None:
    assert run_a.trainer.state.global_step == MAX_STEPS
    assert len(logged(run_a.trainer, "loss")) == MAX_STEPS
    assert run_a.loss_after < run_a.loss_before - 0.03, (run_a.loss_before, run_a.loss_after)


def test_only_adapter_parameters_change(run_a: Run) -> None:
    after = dict(run_a.model.named_parameters())
    assert set(after) == set(run_a.params_before)
    lora_b = [n for n in after if ".lora_B." in n]
    assert lora_b
    for name, param in after.items():
        if ".lora_" in name:
            assert param.requires_grad, name
        else:
            assert not param.requires_grad, name
            assert torch.equal(param.detach(), run_a.params_before[name]), f"base weight {name} changed"
    for name in lora_b:
        assert not run_a.params_before[name].any(), f"{name} must start at zero"
        assert after[name].detach().abs().max() > 0, f"{name} is still zero after training"


def test_checkpoints_hold_only_the_adapter(run_a: Run) -> None:
    steps = list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    found = sorted(p.name for p in run_a.output_dir.glob("checkpoint-*"))
    assert found == sorted(f"checkpoint-{s}" for s in steps)
    for step in steps:
        folder = run_a.output_dir / f"checkpoint-{step}"
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        for full_model_file in ("model.safetensors", "pytorch_model.bin", "config.json"):
            assert not (folder / full_model_file).exists(), f"{folder.name} holds {full_model_file}"
        model_files = [
            p for p in folder.iterdir() if p.name.startswith(("model", "adapter_model", "pytorch_model"))
        ]
        model_bytes = sum(p.stat().st_size for p in model_files)
        assert model_bytes < run_a.base_bytes / 4, (sorted(p.name for p in model_files), model_bytes)
        # the optimizer holds state for the adapter only
        assert (folder / "optimizer.pt").stat().st_size < run_a.base_bytes
        saved = load_file(folder / "adapter_model.safetensors")
        assert_same_tensors(saved, run_a.snapshots.at_save[step])
        config = hf_peft.PeftConfig.from_pretrained(str(folder))
        assert config.peft_type == "LORA" and config.r == 16 and config.task_type == "CAUSAL_LM"


def test_saved_adapter_loads_in_hf_peft_with_the_same_logits(run_a: Run) -> None:
    expected = eval_logits(run_a.model)
    reference = hf_peft.PeftModel.from_pretrained(ARCHS[run_a.arch](), str(run_a.final_dir))
    torch.testing.assert_close(eval_logits(reference), expected, atol=1e-5, rtol=0)
    # an intermediate checkpoint too: both libraries read checkpoint-4 into the same model
    ckpt = str(run_a.output_dir / "checkpoint-4")
    theirs = hf_peft.PeftModel.from_pretrained(ARCHS[run_a.arch](), ckpt)
    ours = peftkit.PeftModel.from_pretrained(ARCHS[run_a.arch](), ckpt)
    torch.testing.assert_close(eval_logits(ours), eval_logits(theirs), atol=1e-5, rtol=0)
    assert not torch.allclose(eval_logits(ours), expected), (
        "checkpoint-4 should differ from the final adapter"
    )


def test_resume_from_checkpoint_reaches_the_same_step_and_adapter(run_a: Run, tmp_path: Path) -> None:
    checkpoint = run_a.output_dir / "checkpoint-4"
    model = peftkit.get_peft_model(ARCHS[run_a.arch](), lora_config())
    fresh = adapter_tensors(model)
    snapshots = AdapterSnapshots(model)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=DATASET, callbacks=[snapshots])
    with transformers_warnings() as warnings_logged:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == MAX_STEPS
    # the resumed run started from checkpoint-4's adapter, not from a fresh init
    start_step, at_start = snapshots.first_step
    assert start_step == 4
    assert_same_tensors(at_start, load_file(checkpoint / "adapter_model.safetensors"))
    assert any(not torch.equal(at_start[k], fresh[k]) for k in fresh)
    # and it took the same two steps as run A (optimizer, scheduler and data order restored)
    assert_same_tensors(adapter_tensors(model), adapter_tensors(run_a.model), exact=False)
    # the log history is restored from the checkpoint, then the two new steps are appended
    assert logged(trainer, "loss") == pytest.approx(logged(run_a.trainer, "loss"), rel=1e-5)
    noisy = [m for m in warnings_logged if "missing keys" in m.lower() or "unexpected keys" in m.lower()]
    assert not noisy, noisy[0][:500]


# ----- the same Trainer run with HF peft -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trainer_run_matches_hf_peft(arch: str, tmp_path: Path) -> None:
    """Same seed, same config, same Trainer: every logged loss and the final adapter agree with HF peft."""
    runs = {}
    for name, lib in (("peftkit", peftkit), ("hf", hf_peft)):
        model = lib.get_peft_model(ARCHS[arch](), lora_config(lib))
        trainer = Trainer(
            model=model, args=training_args(tmp_path / name, save_strategy="no"), train_dataset=DATASET
        )
        trainer.train()
        runs[name] = (logged(trainer, "loss"), logged(trainer, "grad_norm"), adapter_tensors(model))
    (our_loss, our_norm, ours), (hf_loss, hf_norm, theirs) = runs["peftkit"], runs["hf"]
    assert our_loss == pytest.approx(hf_loss, rel=1e-5)
    assert our_norm == pytest.approx(hf_norm, rel=1e-4)
    assert_same_tensors(ours, theirs, exact=False)


# ----- gradient checkpointing ----------------------------------------------------------------------------------
@contextmanager
def count_calls(module: nn.Module) -> Iterator[list[int]]:
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def loss_and_lora_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], int]:
    """(loss, {lora param: grad}, forward calls of the first block) for one step on FIXED_BATCH."""
    model.train()
    model.zero_grad(set_to_none=True)
    with count_calls(attention_of_first_block(model)) as calls:
        loss = model(**FIXED_BATCH).loss
        loss.backward()
    grads = {
        n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if ".lora_" in n
    }
    return loss.detach(), grads, calls[0]


@pytest.mark.parametrize(
    "kwargs",
    [None, {"use_reentrant": True}, {"use_reentrant": False}],
    ids=["default", "reentrant", "non_reentrant"],
)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gradient_checkpointing_enable_gives_the_same_grads(arch: str, kwargs: dict | None) -> None:
    model = peftkit.get_peft_model(ARCHS[arch](), lora_config())
    with torch.no_grad():  # B = 0 would make every A grad zero; give the adapter a non-trivial start
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    loss_ref, grads_ref, calls_ref = loss_and_lora_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    loss, grads, calls = loss_and_lora_grads(model)
    assert calls_ref == 1 and calls == 2, "checkpointing should re-run the block in backward"
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient under gradient checkpointing"
        assert grads_ref[name].abs().max() > 0, name
        torch.testing.assert_close(grad, grads_ref[name], msg=name)
    model.gradient_checkpointing_disable()
    assert loss_and_lora_grads(model)[2] == 1


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trainer_gradient_checkpointing_matches_plain_training(arch: str, tmp_path: Path) -> None:
    runs = {}
    for gc in (False, True):
        model = peftkit.get_peft_model(ARCHS[arch](), lora_config())
        args = training_args(tmp_path / str(gc), max_steps=3, save_strategy="no", gradient_checkpointing=gc)
        trainer = Trainer(model=model, args=args, train_dataset=DATASET)
        with count_calls(attention_of_first_block(model)) as calls:
            trainer.train()
        runs[gc] = (logged(trainer, "loss"), logged(trainer, "grad_norm"), adapter_tensors(model), calls[0])
    (loss, norm, adapter, calls), (gc_loss, gc_norm, gc_adapter, gc_calls) = runs[False], runs[True]
    assert (calls, gc_calls) == (3, 6), "Trainer(gradient_checkpointing=True) should re-run each block"
    assert all(n > 0 for n in gc_norm)
    assert gc_loss == pytest.approx(loss, rel=1e-5)
    assert gc_norm == pytest.approx(norm, rel=1e-4)
    assert_same_tensors(gc_adapter, adapter, exact=False)


# ----- print_trainable_parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_print_trainable_parameters_matches_hf_peft(
    arch: str, task_type: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = {}
    for name, lib in (("peftkit", peftkit), ("hf", hf_peft)):
        model = lib.get_peft_model(ARCHS[arch](), lib.LoraConfig(r=16, task_type=task_type))
        capsys.readouterr()
        model.print_trainable_parameters()
        printed[name] = (capsys.readouterr().out, model.get_nb_trainable_parameters())
    assert printed["peftkit"] == printed["hf"]
    assert printed["peftkit"][0].startswith("trainable params: ")


# ----- the seed brief, almost verbatim ---------------------------------------------------------------------------
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = (
        "below is an instruction that describes a task write a response completes the request "
        "name three colours red green blue give two animals cat dog say hello world"
    ).split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_seed_brief_flow(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import peftkit as peft

    texts = [
        "below is an instruction that describes a task name three colours red green blue",
        "below is an instruction give two animals cat dog",
        "say hello world",
        "write a response that completes the request say hello",
        "name three colours red blue green",
    ] * 2
    tokenizer = tiny_tokenizer()
    tokenized_dataset = ListDataset([tokenizer(t) for t in texts])
    model = ARCHS[arch]()

    lora_config = peft.LoraConfig(r=16)
    peft_model = peft.get_peft_model(model, lora_config)
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: ")

    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "alpaca_lora_model"),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        learning_rate=2e-4,
        logging_steps=1,
        save_steps=2,
        fp16=False,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=tokenized_dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    assert trainer.state.global_step == len(texts) // 2
    assert all(torch.isfinite(torch.tensor(loss)) for loss in logged(trainer, "loss"))

    out = tmp_path / "alpaca_lora_model"
    peft_model.save_pretrained(str(out))
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "README.md",  # the model card, as HF peft writes one
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert {"checkpoint-2", "checkpoint-4"} <= set(
        checkpoints
    )  # (recent transformers also save the last step)
    for name in checkpoints:
        assert (out / name / "adapter_model.safetensors").is_file()
        assert not (out / name / "model.safetensors").exists()
    reloaded = peft.PeftModel.from_pretrained(ARCHS[arch](), str(out))
    torch.testing.assert_close(eval_logits(reloaded), eval_logits(peft_model), atol=1e-6, rtol=0)
    assert os.path.getsize(out / "adapter_model.safetensors") < 100_000
