"""Fixtures for the training application: a tiny random Llama with an offline-built tokenizer, and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ["cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird"]


def rows(n: int = 12) -> list[dict]:
    """Alpaca rows of a toy task: reverse a word."""
    return [{"instruction": "Reverse the word.", "input": WORDS[i % len(WORDS)], "output": WORDS[i % len(WORDS)][::-1]}
            for i in range(n)]


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def build_tiny_model(folder: Path, chat_template: bool) -> Path:
    """Save a 2-layer random Llama and a byte-level BPE tokenizer (trained here, offline) into ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [json.dumps(r) for r in rows()] + ["Below is an instruction that describes a task. ### Response:"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>",
                                   eos_token="<|end|>" if chat_template else "</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"), chat_template=True)


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


@pytest.fixture
def data_files(tmp_path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "train.jsonl", rows(12)), write_jsonl(tmp_path / "eval.jsonl", rows(4))


@pytest.fixture
def train_args(tiny_chat_model, data_files, tmp_path):
    """Flags for a few-second training run on the tiny model; append more flags as needed."""

    def make(output: Path | None = None, *extra: str) -> list[str]:
        train_file, eval_file = data_files
        return ["train", "--model", str(tiny_chat_model), "--data", str(train_file), "--eval-data", str(eval_file),
                "--max-steps", "4", "--batch-size", "4", "--save-every", "2", "--log-every", "1", "--r", "4",
                "--lr", "1e-2", "--warmup", "1", "--threads", "1", "--no-progress",
                "--output", str(output or tmp_path / "out"), *extra]

    return make
