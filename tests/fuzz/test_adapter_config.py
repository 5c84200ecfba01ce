"""Fuzzed `adapter_config.json`: wrong types, unknown/missing keys, huge or negative numbers, bad `peft_type`,
broken bytes. Loading ends in a config or one clear error naming the file; never a traceback from deep inside.
"""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

import peftkit
from peftkit import LoraConfig, PeftConfig
from tests.fuzz.common import FUZZ, assert_clear, json_values
from tests.models import tiny_llama

BASE = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).to_dict()
FIELDS = sorted(BASE) + ["layer_replication", "use_dora", "rank_pattern", "loftq_config", "megatron_config"]
PEFT_TYPES = [t.value for t in peftkit.PeftType]

edits = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(FIELDS) | st.text(max_size=10), json_values),
        st.tuples(st.just("del"), st.sampled_from(FIELDS), st.none()),
        st.tuples(st.just("set"), st.just("peft_type"), st.sampled_from(PEFT_TYPES) | json_values),
    ),
    max_size=4,
)


def _edited(changes: list) -> dict:
    data = dict(BASE)
    for op, key, value in changes:
        if op == "set":
            data[key] = value
        else:
            data.pop(key, None)
    return data


# how the edited dict reaches the disk: plain JSON, or bytes a broken writer (or a disk) could leave
encodings = st.sampled_from(["json", "bom", "truncated", "bad-utf8", "empty", "not-an-object"])


def _encode(data: dict, how: str, cut: int) -> bytes:
    text = json.dumps(data).encode()
    return {
        "json": text,
        "bom": b"\xef\xbb\xbf" + text,
        "truncated": text[: cut % max(len(text), 1)],
        "bad-utf8": text[:-1] + b'"\xff\xfe"}',
        "empty": b"",
        "not-an-object": json.dumps([data]).encode(),
    }[how]


@FUZZ
@given(changes=edits, how=encodings, cut=st.integers(0, 10_000))
def test_config_loads_or_fails_clearly(tmp_path_factory, changes, how, cut):
    folder = tmp_path_factory.mktemp("adapter")
    path = folder / "adapter_config.json"
    path.write_bytes(_encode(_edited(changes), how, cut))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys warn, by design
        try:
            config = PeftConfig.from_pretrained(str(folder))
        except Exception as err:  # noqa: BLE001 - the assertion is on the type and the message
            assert_clear(err, str(path))
            return
    assert isinstance(config, PeftConfig)
    json.loads(config.to_json_bytes())  # what loaded can be written back


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A real LoRA adapter on the tiny Llama (r=4 on q_proj, v_proj), saved by peftkit."""
    folder = tmp_path_factory.mktemp("saved")
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(**{k: v for k, v in BASE.items() if k != "peft_type"})
    )
    model.save_pretrained(str(folder))
    return folder


small_ints = st.integers(-3, 64) | st.sampled_from([0, -1, 2**31, 2**63, 10**30])
lora_edits = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "r",
                "lora_alpha",
                "lora_dropout",
                "target_modules",
                "bias",
                "use_dora",
                "task_type",
                "layers_to_transform",
                "rank_pattern",
                "modules_to_save",
                "init_lora_weights",
                "use_rslora",
                "exclude_modules",
            ]
        ),
        small_ints | json_values,
    ),
    max_size=3,
)


@FUZZ
@given(changes=lora_edits)
def test_peft_model_from_pretrained_with_fuzzed_config(tmp_path_factory, saved_adapter, changes):
    """The real weights with a fuzzed config next to them: a model or one clear error (naming the file), and
    never an allocation sized by a lying `r` (the file's shapes are checked first)."""
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_model.safetensors").write_bytes(
        (saved_adapter / "adapter_model.safetensors").read_bytes()
    )
    data = json.loads((saved_adapter / "adapter_config.json").read_text())
    data.update(dict(changes))
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peftkit.PeftModel.from_pretrained(tiny_llama(), str(folder))
        except Exception as err:  # noqa: BLE001
            assert_clear(err, str(folder))
            return
    assert isinstance(model, peftkit.PeftModel)


def test_a_lying_rank_is_refused_before_allocating(tmp_path, saved_adapter):
    """r=100 000 000 next to an r=4 file would allocate 12.8 GB per LoRA matrix; it is refused first."""
    from tests.fuzz.common import max_rss_mb

    (tmp_path / "adapter_model.safetensors").write_bytes(
        (saved_adapter / "adapter_model.safetensors").read_bytes()
    )
    data = json.loads((saved_adapter / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "r": 100_000_000}))
    before = max_rss_mb()
    with pytest.raises(ValueError, match="r=100000000") as info:
        peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert_clear(info.value, str(tmp_path / "adapter_config.json"))
    assert max_rss_mb() - before < 200
