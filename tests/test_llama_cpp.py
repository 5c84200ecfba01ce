"""peftkit's GGUF exports run in llama.cpp itself (the prebuilt CPU library of `llama-cpp-cffi`).

- A hand-built LoRA adapter on every projection (q/k with llama.cpp's rotary row order) on the embedded
  default model: llama.cpp's logits with the adapter minus without it equal peftkit's delta, (1) on the
  base's own Q4_1 GGUF within the noise of llama.cpp's quantized arithmetic (per prompt relative L2 error
  <= 0.45 and cosine >= 0.97, mean error <= 0.25; measured 0.12 / 0.09 / 0.35, cosine >= 0.975), and (2) on
  an F32 GGUF of the same dequantized base to relative L2 error <= 1e-4 (measured 5e-6; a wrong rotary row
  order or scaling would be off by O(1)).
- The adapter merged into the model and exported as one GGUF (F32 and Q8_0, tokenizer and chat template
  included) decodes greedily to the same tokens in llama.cpp as peftkit's merged model (F32: identical; Q8_0:
  same logits to 1.5).
- The default run's adapter (`peftkit train` with no arguments; a finished run folder can be given as
  $PEFTKIT_DEFAULT_RUN, else the test trains it, ~3 min on an idle 2-core CPU): held-out exact match of the
  exported adapter on the Q4_1 base in llama.cpp within 2 points of peftkit's own (the run's report.json).

Skipped only where llama-cpp-cffi is not installed (or its library cannot be loaded; the reason is shown).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import peftkit

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def runtime():
    from . import llama_runtime

    try:
        llama_runtime.load_library()
    except (ImportError, OSError) as e:
        pytest.skip(f"llama.cpp runtime unavailable: {e}")
    return llama_runtime


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """(HF folder of the embedded default, its Q4_1 GGUF, tokenizer, peft model with a hand-built adapter,
    the adapter's folder and its llama.cpp export)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.export.gguf_adapter import write_gguf_adapter
    from peftkit.train.default_model import default_model_path, find_gguf

    torch.set_num_threads(1)
    folder = default_model_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(0)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peftkit.get_peft_model(model, config).eval()
    with torch.no_grad():  # known tensors: seeded A, B scaled so the logits move by a few units
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    tmp = tmp_path_factory.mktemp("llama_cpp")
    peft_model.save_pretrained(tmp / "adapter")
    write_gguf_adapter(tmp / "adapter", tmp / "adapter.gguf", model.config)
    return folder, find_gguf(), tokenizer, peft_model, tmp


def _peftkit_logits(peft_model, ids, adapter: bool):
    with torch.no_grad():
        if adapter:
            return peft_model(torch.tensor([ids])).logits[0, -1].numpy()
        with peft_model.disable_adapter():
            return peft_model(torch.tensor([ids])).logits[0, -1].numpy()


def _delta_errors(runtime, gguf_file, default):
    """[(relative L2 error, cosine)] of llama.cpp's vs peftkit's adapter delta for each prompt."""
    _, _, tokenizer, peft_model, tmp = default
    llama = runtime.LlamaCpp(gguf_file)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    without = [llama.logits(ids) for ids in prompts]
    llama.set_adapter(tmp / "adapter.gguf")
    out = []
    for ids, base in zip(prompts, without):
        ours = _peftkit_logits(peft_model, ids, True) - _peftkit_logits(peft_model, ids, False)
        theirs = llama.logits(ids) - base
        error = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
        cosine = theirs @ ours / np.linalg.norm(theirs) / np.linalg.norm(ours)
        out.append((float(error), float(cosine), float(np.abs(ours).max())))
    llama.close()
    print("relative L2 error, cosine, max |delta|:", out)
    return out


def test_adapter_delta_on_the_default_q4_1_gguf(runtime, default):
    errors = _delta_errors(runtime, default[1], default)
    for error, cosine, size in errors:
        assert size > 3.0  # a delta well above llama.cpp's Q4_1/Q8_1 arithmetic noise (~0.7 max)
        assert error <= 0.45 and cosine >= 0.97
    assert np.mean([e[0] for e in errors]) <= 0.25


def test_adapter_delta_on_an_f32_gguf_of_the_same_base(runtime, default, tmp_path):
    from peftkit.export.gguf_model import write_gguf_model

    folder, _, _, peft_model, _ = default
    base = peft_model.get_base_model()
    with peft_model.disable_adapter():
        state = {k: v for k, v in base.state_dict().items() if "lora_" not in k}
    state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    write_gguf_model(state, base.config, folder, tmp_path / "base.gguf", dtype="f32", tokenizer_pre="smollm")
    for error, cosine, _ in _delta_errors(runtime, tmp_path / "base.gguf", default):
        assert error <= 1e-4 and cosine >= 0.99999


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_merged_gguf_decodes_like_peftkit(runtime, default, tmp_path, dtype):
    import copy

    from peftkit.export.gguf_model import write_gguf_model

    folder, _, tokenizer, peft_model, _ = default
    merged = copy.deepcopy(peft_model).merge_and_unload()
    write_gguf_model(
        merged.state_dict(), merged.config, folder, tmp_path / "m.gguf", dtype=dtype, tokenizer_pre="smollm"
    )
    llama = runtime.LlamaCpp(tmp_path / "m.gguf")
    assert llama.tokenize(PROMPTS[2]) == tokenizer(PROMPTS[2]).input_ids  # the GGUF's tokenizer is the base's
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            ours = merged(torch.tensor([ids])).logits[0, -1].numpy()
            generated = merged.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id
            )[0, len(ids) :].tolist()
        theirs = llama.logits(ids)
        assert np.abs(theirs - ours).max() <= (0.05 if dtype == "f32" else 1.5)
        if dtype == "f32":
            expected = [t for t in generated if t != tokenizer.eos_token_id]
            assert llama.greedy(ids, 12, {tokenizer.eos_token_id}) == expected[: len(expected)]
    llama.close()


def test_default_run_exact_match_in_llama_cpp(runtime, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from peftkit.export.gguf_adapter import write_gguf_adapter
    from peftkit.train.data import encode_prompt, load_examples
    from peftkit.train.default_model import default_model_path, find_gguf
    from peftkit.train.evaluate import default_max_new_tokens
    from peftkit.train.loop import BUNDLED_EVAL, bundled

    run = Path(os.environ.get("PEFTKIT_DEFAULT_RUN") or tmp_path / "run")
    if not (run / "report.json").is_file():
        cmd = [sys.executable, "-m", "peftkit.cli", "train", "--output", str(run), "--no-progress"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stderr
    report = json.loads((run / "report.json").read_text())
    ours = report["eval"]["exact_match_after"]
    folder = default_model_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    write_gguf_adapter(run / "adapter", tmp_path / "dates.gguf", AutoConfig.from_pretrained(folder))
    rows = load_examples([bundled(BUNDLED_EVAL)])[: ours["total"]]
    max_new = default_max_new_tokens(tokenizer, rows)
    llama = runtime.LlamaCpp(find_gguf(), threads=2)
    llama.set_adapter(tmp_path / "dates.gguf")
    hits = 0
    for row in rows:
        new = llama.greedy(encode_prompt(tokenizer, row), max_new, {tokenizer.eos_token_id})
        hits += tokenizer.decode(new, skip_special_tokens=True).strip() == row.response.strip()
    llama.close()
    theirs = hits / len(rows)
    print(f"held-out exact match: peftkit {ours['exact_match']:.3f}, llama.cpp (Q4_1 + adapter) {theirs:.3f}")
    assert abs(theirs - ours["exact_match"]) <= 0.02
