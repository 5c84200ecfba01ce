"""The fast GGUF conversion of the default model: the same folder as transformers' GGUF path (bit-identical
weights, equal config and tokenizer), a clear error and nothing left behind for a corrupt file, and the
transformers fallback (with the reason) for a GGUF the fast path does not cover."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from peftkit.train import default_model
from peftkit.train.errors import PeftkitError
from peftkit.train.gguf_read import GGUFFile

DATA = Path(default_model.__file__).parent.parent / "data"


LLAMA_KV = {
    "llama.embedding_length": 256,
    "llama.block_count": 0,
    "llama.feed_forward_length": 512,
    "llama.attention.head_count": 4,
    "llama.vocab_size": 4,
}


def _no_fallback(*args, **kwargs):
    raise AssertionError("the transformers fallback ran, the fast conversion should cover this file")


# ---- the reader on small files written by the `gguf` package --------------------------------------------
def _write_gguf(path: Path, arch: str, tensors: dict, kv: dict | None = None) -> None:
    """A small GGUF: ``tensors`` name -> (fp32 array, GGMLQuantizationType), quantized with gguf.quants."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (kv or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8:  # already the packed blocks of qtype
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = array.astype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reader_matches_gguf_py_on_every_supported_type_and_value(tmp_path):
    """Metadata of each kind and F32/F16/Q8_0/Q4_1 tensors read back exactly as gguf-py reads them."""
    import gguf

    rng = np.random.default_rng(0)
    types = gguf.GGMLQuantizationType
    tensors = {
        f"t.{qtype.name}": (rng.standard_normal((6, 64)).astype(np.float32) * 3 + 1, qtype)
        for qtype in (types.F32, types.F16, types.Q8_0, types.Q4_1)
    }
    kv = {"x.count": 7, "x.eps": 1e-5, "x.flag": True, "x.words": ["Ġ t", "é ü", ""], "x.ids": [3, 1, 4]}
    path = tmp_path / "small.gguf"
    _write_gguf(path, "test", tensors, {**kv, "x.name": "naïve"})
    reference = gguf.GGUFReader(path)
    with GGUFFile(path) as mine:
        assert mine.metadata["general.architecture"] == "test" and mine.metadata["x.name"] == "naïve"
        assert mine.metadata["x.count"] == 7 and mine.metadata["x.flag"] is True
        assert mine.metadata["x.eps"] == float(np.float32(1e-5))
        assert mine.metadata["x.words"] == kv["x.words"] and mine.metadata["x.ids"].tolist() == [3, 1, 4]
        for tensor in reference.tensors:
            want = gguf.dequantize(tensor.data, tensor.tensor_type)
            got = mine.tensor(tensor.name)
            assert got.dtype == np.float32 and got.shape == (6, 64)
            assert np.array_equal(got.view(np.uint32), want.reshape(6, 64).view(np.uint32)), tensor.name


# ---- corrupt files: one clear error, nothing in the cache -----------------------------------------------
@pytest.mark.parametrize(
    ("keep", "what"),
    [
        (10, "the tensor count"),
        (1_000_000, "string"),  # cut inside the vocabulary
        (40_000_000, "bytes of data of tensor"),  # header intact, tensor data cut
    ],
)
def test_truncated_gguf_names_the_file_and_writes_nothing(monkeypatch, tmp_path, keep, what):
    broken = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(default_model.find_gguf(), "rb") as real:
        broken.write_bytes(real.read(keep))
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    monkeypatch.setattr(default_model, "find_gguf", lambda: broken)
    monkeypatch.setattr(default_model, "_convert_with_transformers", _no_fallback)
    with pytest.raises(PeftkitError, match="expected") as error:
        default_model.default_model_path(progress=False)
    message = str(error.value)
    assert str(broken) in message and what in message and "truncated or corrupt" in message
    assert list(cache.iterdir()) == []


def test_not_a_gguf_names_the_file_and_keeps_the_old_folder(monkeypatch, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    old = default_model.cache_dir() / default_model.MODEL_DIRNAME
    old.mkdir(parents=True)
    (old / "config.json").write_text(
        "{}"
    )  # an older, partial folder (no weights): re-converted, kept on error
    monkeypatch.setattr(default_model, "find_gguf", lambda: bad)
    with pytest.raises(PeftkitError, match=r"model\.gguf: not a GGUF file: expected the magic bytes b'GGUF'"):
        default_model.default_model_path(progress=False)
    assert sorted(p.name for p in old.parent.iterdir()) == [default_model.MODEL_DIRNAME]
    assert (old / "config.json").read_text() == "{}"


# ---- outside the fast path: the transformers fallback, with the reason ----------------------------------
def test_unsupported_gguf_falls_back_to_transformers_with_the_reason(monkeypatch, tmp_path):
    import gguf

    other = tmp_path / "other.gguf"
    _write_gguf(
        other, "qwen2", {"token_embd.weight": (np.ones((4, 32), np.float32), gguf.GGMLQuantizationType.F32)}
    )
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "find_gguf", lambda: other)
    calls = []

    def fallback(gguf_path, folder, progress):
        assert list(folder.iterdir()) == []  # whatever the fast path began is gone
        calls.append(gguf_path)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(default_model, "_convert_with_transformers", fallback)
    with pytest.warns(UserWarning, match=r"other\.gguf: the fast GGUF conversion does not cover .*'qwen2'"):
        folder = default_model.default_model_path(progress=False)
    assert calls == [other] and (folder / "config.json").read_text() == "{}"


def test_unknown_quant_type_is_refused_not_guessed(tmp_path):
    """A Llama GGUF with a Q4_K tensor: the fast converter refuses (UnsupportedGGUF) and writes nothing."""
    import gguf

    from peftkit.train.gguf_convert import convert_llama_gguf
    from peftkit.train.gguf_read import UnsupportedGGUF

    path = tmp_path / "k.gguf"
    packed = np.zeros((4, 144), np.uint8)  # 4 rows of one 256-value Q4_K block (144 bytes) each
    _write_gguf(path, "llama", {"token_embd.weight": (packed, gguf.GGMLQuantizationType.Q4_K)}, LLAMA_KV)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(UnsupportedGGUF, match="'token_embd.weight' has ggml type 12"):
        convert_llama_gguf(path, folder)
    assert list(folder.iterdir()) == []


# ---- the real thing --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fast_conversion_equals_the_transformers_conversion(monkeypatch, tmp_path):
    """The fast folder against the folder transformers' GGUF path writes: same files; every tensor the same
    name, shape, dtype and bits; equal configs; equal tokenizer.json; tokenizers that encode the bundled
    data and render the chat template identically; the LM head re-tied on load."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.train.data import load_examples, render_prompt, render_response

    gguf_file = default_model.find_gguf()
    reference = tmp_path / "reference"
    reference.mkdir()
    patched = gguf.GGUFReader, gguf.get_tensor_name_map
    default_model._convert_with_transformers(gguf_file, reference, progress=False)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == patched  # the one-parse patches are undone
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "_convert_with_transformers", _no_fallback)
    folder = default_model.default_model_path(progress=False)

    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())
    with (
        safe_open(reference / "model.safetensors", "pt") as want,
        safe_open(folder / "model.safetensors", "pt") as got,
    ):
        assert got.metadata() == want.metadata() == {"format": "pt"}
        assert sorted(got.keys()) == sorted(want.keys()) and len(want.keys()) == 272
        for key in want.keys():
            a, b = want.get_tensor(key), got.get_tensor(key)
            assert (a.dtype, a.shape) == (b.dtype, b.shape) == (torch.float32, b.shape), key
            assert torch.equal(a, b), key

    def load(name, directory):
        data = json.loads((directory / name).read_text())
        data.pop("transformers_version", None)
        return data

    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert load(name, folder) == load(name, reference), name
    # is_local / local_files_only are from_pretrained's load-time arguments, recorded by the reference only
    load_time = {"is_local", "local_files_only"}
    want_config = {k: v for k, v in load("tokenizer_config.json", reference).items() if k not in load_time}
    assert load("tokenizer_config.json", folder) == want_config
    assert (folder / "chat_template.jinja").read_text() == (reference / "chat_template.jinja").read_text()

    want_tok, got_tok = AutoTokenizer.from_pretrained(reference), AutoTokenizer.from_pretrained(folder)
    assert type(got_tok) is type(want_tok)
    examples = load_examples([str(DATA / "dates_train.jsonl"), str(DATA / "dates_eval.jsonl")])
    texts = []
    for example in examples:
        prompt = render_prompt(want_tok, example)
        assert render_prompt(got_tok, example) == prompt
        texts.append(prompt + render_response(want_tok, example, prompt))
    texts += ["  leading spaces, émojis 🙂 and tabs\t<|im_end|> <|endoftext|>", "日本語のテキスト\n\n"]
    want_ids, got_ids = want_tok(texts)["input_ids"], got_tok(texts)["input_ids"]
    assert got_ids == want_ids
    assert got_tok.batch_decode(want_ids) == want_tok.batch_decode(want_ids)
    assert got_tok.batch_decode(want_ids, skip_special_tokens=True) == want_tok.batch_decode(
        want_ids, skip_special_tokens=True
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for kwargs in ({"tokenize": False}, {"tokenize": True}):
        assert got_tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs) == (
            want_tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.architectures == ["LlamaForCausalLM"]
