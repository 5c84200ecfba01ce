"""Fuzzed `adapter_model.safetensors`: truncated, corrupt or lying headers (one declaring terabytes), wrong
dtypes, extra or missing keys. Loading gives tensors or one clear error naming the file, without allocating
what a lying header declares.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as st_save

import peftkit
from peftkit import LoraConfig
from peftkit.io import load_weights_file
from tests.fuzz.common import FUZZ, assert_clear, json_values, max_rss_mb
from tests.models import tiny_llama


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peftkit.get_peft_model(tiny_llama(), config).save_pretrained(str(folder))
    return folder


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


TB = 2**40
header_lies = st.one_of(
    st.tuples(st.just("shape"), st.lists(st.sampled_from([0, 1, 4, 2**20, TB, 2**62, -1]), max_size=4)),
    st.tuples(st.just("dtype"), st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "X9", "", "F4"])),
    st.tuples(st.just("data_offsets"), st.lists(st.sampled_from([0, 8, 64, TB, 2**64, -5]), max_size=3)),
    st.tuples(st.just("entry"), json_values),
)
damages = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 4000)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=8),
    ),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 7, TB, 2**63, 2**64 - 1])),
    st.tuples(st.just("lie"), st.lists(header_lies, min_size=1, max_size=3)),
    st.tuples(st.just("garbage"), st.binary(max_size=64)),
)


def _damage(data: bytes, damage: tuple) -> bytes:
    kind, arg = damage
    if kind == "truncate":
        return data[: arg % len(data)]
    if kind == "flip":
        out = bytearray(data)
        for pos, byte in arg:
            out[pos % len(out)] = byte
        return bytes(out)
    if kind == "length":
        return struct.pack("<Q", arg) + data[8:]
    if kind == "garbage":
        return arg
    header, body = _split(data)
    key = sorted(k for k in header if k != "__metadata__")[0]
    for field, value in arg:
        if field == "entry" or not isinstance(header[key], dict):
            header[key] = value
        else:
            header[key][field] = value
    return _join(header, body)


@FUZZ
@given(damage=damages)
def test_damaged_safetensors_loads_or_fails_clearly(tmp_path_factory, saved_adapter, damage):
    path = tmp_path_factory.mktemp("st") / "adapter_model.safetensors"
    path.write_bytes(_damage((saved_adapter / "adapter_model.safetensors").read_bytes(), damage))
    before = max_rss_mb()
    try:
        tensors = load_weights_file(str(path))
    except Exception as err:  # noqa: BLE001 - the assertion is on the type and the message
        assert_clear(err, str(path))
    else:
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert max_rss_mb() - before < 200, "a damaged header made the loader allocate"


def test_header_declaring_terabytes_is_refused_without_allocating(tmp_path):
    """A 100-byte file whose header declares a 4 TB float32 tensor (offsets consistent with that size)."""
    n = 2**40
    header = {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(_join(header, b"\0" * 16))
    before = max_rss_mb()
    with pytest.raises(ValueError, match="outside the file") as info:
        load_weights_file(str(path))
    assert str(path) in str(info.value)
    assert max_rss_mb() - before < 50


tensor_edits = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 100)),
        st.tuples(st.just("extra"), st.text(min_size=1, max_size=30)),
        st.tuples(
            st.just("dtype"),
            st.integers(0, 100),
            st.sampled_from(
                [torch.int64, torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64]
            ),
        ),
        st.tuples(st.just("shape"), st.integers(0, 100), st.lists(st.integers(0, 9), max_size=3)),
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(edits=tensor_edits)
def test_wrong_tensors_load_into_a_model_or_fail_clearly(tmp_path_factory, saved_adapter, edits):
    """Valid files with the wrong contents: PeftModel.from_pretrained gives a model (missing/extra keys warn)
    or one clear error naming the file."""
    folder = tmp_path_factory.mktemp("adapter")
    shutil.copy(saved_adapter / "adapter_config.json", folder)
    from safetensors.torch import load

    tensors = load((saved_adapter / "adapter_model.safetensors").read_bytes())
    for edit in edits:
        keys = sorted(tensors)
        if edit[0] == "drop" and keys:
            tensors.pop(keys[edit[1] % len(keys)])
        elif edit[0] == "extra":
            tensors[edit[1]] = torch.ones(2)
        elif edit[0] == "dtype" and keys:
            k = keys[edit[1] % len(keys)]
            tensors[k] = tensors[k].to(edit[2])
        elif edit[0] == "shape" and keys:
            tensors[keys[edit[1] % len(keys)]] = torch.zeros(edit[2])
    (folder / "adapter_model.safetensors").write_bytes(st_save(tensors))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peftkit.PeftModel.from_pretrained(tiny_llama(), str(folder))
        except Exception as err:  # noqa: BLE001
            assert_clear(err, str(folder))
            return
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.is_floating_point() and torch.isfinite(p).all(), name
