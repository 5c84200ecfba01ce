"""Fuzzed `peftkit train --config FILE` (YAML or JSON): unknown keys, wrong types, huge, negative or
non-finite numbers, broken bytes. Reading and validating gives options or one `PeftkitError` naming the file
and key (or the flag, for a value of the right type outside its range)."""

from __future__ import annotations

import json

import yaml
from hypothesis import given
from hypothesis import strategies as st

from peftkit.train.errors import PeftkitError
from peftkit.train.options import FIELDS, TrainOptions, load_config_file, make_options
from tests.fuzz.common import FUZZ, assert_clear, json_values

numbers = st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from([0, -1, 1, 2**63, 1e308])
entries = st.dictionaries(
    st.sampled_from(sorted(FIELDS)) | st.text(max_size=12) | st.sampled_from(["max-steps", "batch-size"]),
    numbers | json_values | st.sampled_from(["lora", "cosine", "x.jsonl"]),
    max_size=5,
)
damage = st.sampled_from(["none", "none", "bom", "bad-utf8", "truncate", "not-a-mapping", "empty"])


def _encode(values: dict, suffix: str, how: str, cut: int) -> bytes:
    if how == "not-a-mapping":
        values = [values]
    raw = json.dumps(values) if suffix == ".json" else yaml.safe_dump(values, allow_unicode=True)
    raw = raw.encode()
    return {
        "none": raw,
        "bom": b"\xef\xbb\xbf" + raw,
        "bad-utf8": b"\xff" + raw,
        "truncate": raw[: cut % (len(raw) + 1)],
        "not-a-mapping": raw,
        "empty": b"",
    }[how]


@FUZZ
@given(
    values=entries, suffix=st.sampled_from([".json", ".yaml", ".yml"]), how=damage, cut=st.integers(0, 999)
)
def test_config_file_gives_options_or_one_clear_error(tmp_path_factory, values, suffix, how, cut):
    path = tmp_path_factory.mktemp("c") / f"run{suffix}"
    path.write_bytes(_encode(values, suffix, how, cut))
    try:
        file_values = load_config_file(str(path))
    except Exception as err:  # noqa: BLE001 - the assertion is on the type and the message
        assert isinstance(err, PeftkitError), f"{type(err).__name__}: {err}"
        assert_clear(err, str(path))
        return
    try:
        options = make_options(file_values, {name: None for name in FIELDS})
    except Exception as err:  # noqa: BLE001
        assert isinstance(err, PeftkitError), f"{type(err).__name__}: {err}"
        assert_clear(err, "--")  # a value of the right type out of its range: the flag is named
        return
    assert isinstance(options, TrainOptions)
    for name in ("r", "batch_size", "grad_accum", "max_length"):
        assert getattr(options, name) > 0


def test_wrong_type_names_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("r: 8\nlr: fast\n")
    try:
        load_config_file(str(path))
    except PeftkitError as err:
        assert_clear(err, str(path), "'lr'", "a finite number")
    else:
        raise AssertionError("lr: fast was accepted")
