"""The seed brief's script (`/work/shared/seed/peft-brief.md`), verbatim apart from the import line and a tiny
local model and tokenizer, on what users pass: a tokenized `datasets.Dataset` (Trainer filters its columns by
the model's forward signature, which a plain list never exercises)."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from safetensors.torch import load_file

from .test_trainer import ARCHS, eval_logits, logged, tiny_tokenizer

TEXTS = [
    "below is an instruction that describes a task name three colours red green blue",
    "below is an instruction give two animals cat dog",
    "say hello world",
    "write a response that completes the request say hello",
] * 2


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_seed_brief_script_on_a_datasets_dataset(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    tokenizer = tiny_tokenizer()
    tokenized_dataset = datasets.Dataset.from_dict({"text": TEXTS}).map(
        lambda rows: tokenizer(rows["text"]), batched=True, remove_columns=["text"]
    )
    model = ARCHS[arch]()

    # ----- the brief, verbatim from here (import line: peftkit; LoraConfig is used unqualified there) -----
    import peftkit as peft
    from peftkit import LoraConfig

    lora_config = LoraConfig(r=16)

    peft_model = peft.get_peft_model(model, lora_config)

    peft_model.print_trainable_parameters()

    print("7. Training...")
    training_args = transformers.TrainingArguments(
        output_dir="./alpaca_lora_model",
        num_train_epochs=1,
        per_device_train_batch_size=2,
        learning_rate=2e-4,
        logging_steps=10,
        save_steps=100,
        fp16=False,
        report_to="none",
    )

    trainer = transformers.Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=tokenized_dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    # ----- end of the brief -----
    trainer.train()

    assert capsys.readouterr().out.startswith("trainable params: ")
    assert trainer.state.global_step == len(TEXTS) // 2
    assert all(torch.isfinite(torch.tensor(loss)) for loss in logged(trainer, "train_loss"))
    out = tmp_path / "alpaca_lora_model"
    checkpoint = out / f"checkpoint-{trainer.state.global_step}"  # the last step is always saved
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    assert not (checkpoint / "config.json").exists() and not (checkpoint / "pytorch_model.bin").exists()

    peft_model.save_pretrained("./alpaca_lora_model")
    assert os.path.getsize(out / "adapter_model.safetensors") < 100_000
    reloaded = peft.PeftModel.from_pretrained(ARCHS[arch](), str(out))
    torch.testing.assert_close(eval_logits(reloaded), eval_logits(peft_model), atol=1e-6, rtol=0)

    # resume from the checkpoint with a fresh model: same step, same adapter
    again = peft.get_peft_model(ARCHS[arch](), LoraConfig(r=16))
    resumed = transformers.Trainer(
        model=again,
        args=training_args,
        train_dataset=tokenized_dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == trainer.state.global_step
    torch.testing.assert_close(eval_logits(again), eval_logits(peft_model), atol=1e-6, rtol=0)


WITHOUT_HF_PEFT = """
import importlib.abc, importlib.util, sys

class HidePeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "peft" or name.startswith("peft."):
            raise ModuleNotFoundError(name)

_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "peft" else _find_spec(name, *a)
sys.meta_path.insert(0, HidePeft())

import datasets, transformers
from transformers.utils import is_peft_available
import peftkit as peft
from tokenizers import Tokenizer, models, pre_tokenizers
from tests.models import tiny_gpt2

assert not is_peft_available()
words = "[PAD] [UNK] say hello world name three colours red green blue".split()
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
data = datasets.Dataset.from_dict({"text": ["say hello world", "name three colours red green blue"] * 2})
data = data.map(lambda rows: tok(rows["text"]), batched=True, remove_columns=["text"])
model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=16))
args = transformers.TrainingArguments(
    output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True,
    label_smoothing_factor=0.1, save_steps=1, disable_tqdm=True,
)
trainer = transformers.Trainer(
    model=model, args=args, train_dataset=data,
    data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
)
assert trainer.label_names == ["labels"], trainer.label_names
trainer.train()
assert trainer.state.global_step == 2
assert "peft" not in sys.modules
print("OK")
"""


def test_brief_flow_without_hf_peft_installed(tmp_path: Path) -> None:
    """transformers takes its non-peft road when HF peft is absent; a peftkit model trains the same way."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_HF_PEFT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
