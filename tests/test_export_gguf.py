"""llama.cpp LoRA adapters, read back with the `gguf` reader: llama.cpp's tensor names (from gguf's own
name map), layouts, the file-wide alpha with each module's scaling folded into lora_b, and the rotary row order
of Llama-family q/k projections; and the clear errors for what llama.cpp cannot run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import LlamaConfig

import peftkit
from peftkit.export.gguf_adapter import ExportError, adapter_tensors, write_gguf_adapter

from .models import tiny_gpt2, tiny_llama

gguf = pytest.importorskip("gguf")


def _random_lora(model, folder, **config):
    peft_model = peftkit.get_peft_model(model, peftkit.LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(folder)
    return peft_model


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return fields, tensors


def _field(fields, name):
    f = fields[name]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else float(value[0])


def test_round_trip_names_layouts_scaling_and_rotary_order(tmp_path):
    model = tiny_llama()
    cfg = model.config
    peft_model = _random_lora(
        model,
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
    )
    info = write_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", cfg)
    fields, tensors = _read(tmp_path / "a.gguf")
    assert _field(fields, "general.architecture") == "llama" and _field(fields, "general.type") == "adapter"
    assert _field(fields, "adapter.type") == "lora" and _field(fields, "adapter.lora.alpha") == 8.0
    assert info["tensors"] == len(tensors) == 2 * 4 * cfg.num_hidden_layers
    for layer in range(cfg.num_hidden_layers):
        for module, gname in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("mlp.down_proj", "ffn_down"),
        ]:
            lora = peft_model.get_base_model().model.layers[layer].get_submodule(module)
            A, B = lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach()
            a, b = (
                tensors[f"blk.{layer}.{gname}.weight.lora_a"],
                tensors[f"blk.{layer}.{gname}.weight.lora_b"],
            )
            np.testing.assert_array_equal(a, A.numpy())
            r = A.shape[0]
            want = B.numpy() * 8.0 / math.sqrt(r)  # peftkit's scaled B (rsLoRA: alpha / sqrt(r))
            got = b * (8.0 / r)  # llama.cpp applies alpha / r to the file's b
            if gname in ("attn_q", "attn_k"):  # rows in llama.cpp's rotary order: undo it to compare
                heads = cfg.num_attention_heads if gname == "attn_q" else cfg.num_key_value_heads
                unpermuted = (
                    got.reshape(heads, got.shape[0] // heads // 2, 2, r).swapaxes(1, 2).reshape(got.shape)
                )
                assert not np.allclose(got, unpermuted)
                got = unpermuted
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_gpt2_conv1d_and_clear_errors(tmp_path):
    gpt2 = tiny_gpt2()
    _random_lora(gpt2, tmp_path / "g", r=2, target_modules=["c_attn", "c_fc"])
    arch, _, tensors = adapter_tensors(tmp_path / "g", gpt2.config)
    assert (
        arch == "gpt2"
        and "blk.0.attn_qkv.weight.lora_a" in tensors
        and "blk.1.ffn_up.weight.lora_b" in tensors
    )
    assert tensors["blk.0.attn_qkv.weight.lora_b"].shape == (96, 2)  # (out, r) like llama.cpp's (out, in)

    _random_lora(tiny_llama(), tmp_path / "d", r=2, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(ExportError, match="use_dora"):
        adapter_tensors(tmp_path / "d", tiny_llama().config)
    peftkit.get_peft_model(
        tiny_llama(), peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    ).save_pretrained(tmp_path / "i")
    with pytest.raises(ExportError, match="IA3"):
        adapter_tensors(tmp_path / "i", tiny_llama().config)
    bert_like = LlamaConfig(num_hidden_layers=2)
    bert_like.model_type = "bert"
    with pytest.raises(ExportError, match="'bert'"):
        adapter_tensors(tmp_path / "a" if (tmp_path / "a").exists() else tmp_path / "g", bert_like)


def test_peftkit_export_command(tmp_path):
    """`peftkit export` as a subprocess: the GGUF and the Ollama Modelfile; an existing output is kept."""
    import subprocess
    import sys

    from .train.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", chat_template=True)
    from transformers import AutoModelForCausalLM

    _random_lora(
        AutoModelForCausalLM.from_pretrained(model_dir),
        tmp_path / "adapter",
        r=2,
        target_modules=["q_proj", "o_proj"],
    )
    cmd = [
        sys.executable,
        "-m",
        "peftkit.cli",
        "export",
        "--adapter",
        str(tmp_path / "adapter"),
        "--output",
        str(tmp_path / "out.gguf"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, tensors = _read(tmp_path / "out.gguf")
    assert "blk.1.attn_output.weight.lora_b" in tensors and len(tensors) == 8
    modelfile = (tmp_path / "out.Modelfile").read_text().splitlines()
    assert modelfile[0].startswith("FROM ") and modelfile[1] == f"ADAPTER {(tmp_path / 'out.gguf').resolve()}"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (
        again.returncode == 1
        and "--overwrite" in again.stderr
        and len(again.stderr.strip().splitlines()) == 1
    )


def test_peftkit_export_merged_gguf_q8_0(tmp_path):
    """`peftkit export --merged --dtype q8_0` as a subprocess, read back with the `gguf` reader: every weight
    of peftkit's merged model (q/k in llama.cpp's rotary order) within Q8_0's rounding, norms exact, the
    tokenizer (tokens, types, merges, special ids, chat template) and an Ollama Modelfile with the template."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", chat_template=True)
    peft_model = _random_lora(
        AutoModelForCausalLM.from_pretrained(model_dir),
        tmp_path / "adapter",
        r=2,
        target_modules=["q_proj", "k_proj", "down_proj"],
    )
    merged = peft_model.merge_and_unload().state_dict()
    cmd = [sys.executable, "-m", "peftkit.cli", "export", "--adapter", str(tmp_path / "adapter"), "--merged"]
    cmd += ["--dtype", "q8_0", "--output", str(tmp_path / "m.gguf"), "--model", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == [vocab[i] for i in range(len(vocab))]
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == 3  # control
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert (
        fields["tokenizer.ggml.merges"][:3] and fields["tokenizer.chat_template"] == tokenizer.chat_template
    )
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # this tiny model does not tie its head
    for layer in range(2):
        for hf, name, heads in [
            ("q_proj", "attn_q", 4),
            ("k_proj", "attn_k", 2),
            ("down_proj", "ffn_down", 0),
        ]:
            t = tensors[f"blk.{layer}.{name}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            got = gguf.quants.dequantize(t.data, t.tensor_type)
            module = "self_attn" if heads else "mlp"
            want = merged[f"model.layers.{layer}.{module}.{hf}.weight"].numpy()
            if heads:
                want = (
                    want.reshape(heads, 2, want.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(want.shape)
                )
            # Q8_0: per 32 values, x = d * q with d = max|x| / 127 stored as f16 (relative error <= 2^-11)
            step = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True) / 127
            error = np.abs(got - want).reshape(step.shape[0], -1, 32)
            assert np.all(error <= step * (0.5 + 128 * 2**-11) + 1e-7)
            assert np.abs(got - want).max() > 0  # really quantized
        norm = tensors[f"blk.{layer}.attn_norm.weight"]
        np.testing.assert_array_equal(
            norm.data, merged[f"model.layers.{layer}.input_layernorm.weight"].numpy()
        )
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert modelfile.startswith(f"FROM {(tmp_path / 'm.gguf').resolve()}\n")
