"""`peftkit train --quantize 4bit` (a subprocess, as users run it), then eval/generate on the quantized base; the
adapter it writes gives the same outputs in HF peft on transformers' NF4 model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")
hf_peft = pytest.importorskip("peft")

from peftkit import cli  # noqa: E402


@pytest.fixture(scope="module")
def wide_chat_model(tiny_chat_model, tmp_path_factory):
    """The tiny chat model's tokenizer with a 64-wide Llama (bitsandbytes' CPU 4-bit kernels need rows of
    at least one 64-weight block)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide-chat")
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_train_quantize_4bit_then_eval_and_generate(wide_chat_model, train_args, tmp_path, capsys):
    args = train_args(tmp_path / "run", "--quantize", "4bit")
    args[args.index("--model") + 1] = str(wide_chat_model)
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["eval"]["after"]["loss"] < report["eval"]["before"]["loss"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "quantiz" not in json.dumps(config).lower()  # nothing quantization-specific in the adapter file

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peftkit
    from peftkit.stream_load import load_quantized

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = hf_peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(wide_chat_model, quantization_config=nf4, dtype=torch.float32),
        adapter,
    )
    ours = peftkit.PeftModel.from_pretrained(load_quantized(wide_chat_model, bits=4), adapter)
    ids = torch.arange(2, 18).reshape(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5
        )

    capsys.readouterr()
    train_file = args[args.index("--data") + 1]
    common = ["--adapter", str(adapter), "--quantize", "4bit", "--no-progress"]
    assert cli.main(["eval", *common, "--data", train_file, "--no-exact-match", "--limit", "4"]) == 0
    assert "loss" in capsys.readouterr().out
    assert (
        cli.main(["generate", "cat", *common, "--max-new-tokens", "3"]) == 0
    )  # (a random model may say nothing)


def test_quantize_refuses_methods_without_quantized_layers(train_args, tmp_path, capsys):
    assert cli.main(train_args(tmp_path / "run", "--quantize", "4bit", "--method", "loha")) != 0
    assert (
        "--quantize 4bit works with --method lora, dora, rslora or ia3, not 'loha'" in capsys.readouterr().err
    )
