"""Fuzzed `--data` files (JSONL, JSON, CSV): BOMs, blank lines, CRLF, non-string and nested fields, invalid
UTF-8, very long rows, empty files. `load_examples` gives examples or one `PeftkitError` naming the file (and
the line or row at fault); never a traceback from `json`/`csv`/codecs.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peftkit.train.data import load_examples
from peftkit.train.errors import PeftkitError
from tests.fuzz.common import FUZZ, assert_clear, json_values

text = st.text(max_size=30)
alpaca = st.fixed_dictionaries(
    {"instruction": text | json_values, "output": text | json_values},
    optional={"input": text | json_values},
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]) | json_values, "content": text | json_values}
)
chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values})
rows = st.lists(alpaca | chat | json_values, max_size=6)

# ways a file's bytes go wrong, applied to the well-formed encoding of `rows`
damage = st.sampled_from(
    ["none", "bom", "crlf", "blank-lines", "bad-utf8", "long-row", "empty", "truncate", "nul"]
)


def _damaged(raw: bytes, how: str, cut: int) -> bytes:
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "crlf":
        return raw.replace(b"\n", b"\r\n")
    if how == "blank-lines":
        return b"\n  \n" + raw.replace(b"\n", b"\n\n \t\n")
    if how == "bad-utf8":
        return raw[: cut % (len(raw) + 1)] + b"\xff\xc3(" + raw[cut % (len(raw) + 1) :]
    if how == "empty":
        return b""
    if how == "truncate":
        return raw[: cut % (len(raw) + 1)]
    if how == "nul":
        return raw.replace(b"a", b"\0", 1)
    return raw


def _long_row() -> dict:
    return {"instruction": "x" * 300_000, "output": "y"}


def _jsonl(items: list, how: str) -> bytes:
    items = items + [_long_row()] if how == "long-row" else items
    return "".join(json.dumps(r) + "\n" for r in items).encode()


def _json(items: list, how: str, wrapped: bool) -> bytes:
    items = items + [_long_row()] if how == "long-row" else items
    return json.dumps({"data": items} if wrapped else items).encode()


def _csv(items: list, how: str) -> bytes:
    items = items + [_long_row()] if how == "long-row" else items
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["instruction", "input", "output"])
    for r in items:
        r = r if isinstance(r, dict) else {"instruction": r}
        writer.writerow([r.get(k, "") for k in ("instruction", "input", "output")])
    return buf.getvalue().encode()


def _check(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        examples = load_examples([str(path)])
    except Exception as err:  # noqa: BLE001 - the assertion is on the type and the message
        assert isinstance(err, PeftkitError), f"{type(err).__name__}: {err}"
        assert_clear(err, str(path))
        return
    assert examples and all(isinstance(e.response, str) and e.response for e in examples)
    for e in examples:
        assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in e.messages)


@FUZZ
@given(items=rows, how=damage, cut=st.integers(0, 5000))
def test_jsonl(tmp_path_factory, items, how, cut):
    path = tmp_path_factory.mktemp("d") / "train.jsonl"
    _check(path, _damaged(_jsonl(items, how), how, cut))


@FUZZ
@given(items=rows, how=damage, cut=st.integers(0, 5000), wrapped=st.booleans())
def test_json(tmp_path_factory, items, how, cut, wrapped):
    path = tmp_path_factory.mktemp("d") / "train.json"
    _check(path, _damaged(_json(items, how, wrapped), how, cut))


@FUZZ
@given(items=rows, how=damage, cut=st.integers(0, 5000))
def test_csv(tmp_path_factory, items, how, cut):
    path = tmp_path_factory.mktemp("d") / "train.csv"
    _check(path, _damaged(_csv(items, how), how, cut))


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_arbitrary_bytes(tmp_path_factory, data, suffix):
    _check(tmp_path_factory.mktemp("d") / f"train{suffix}", data)


def test_error_names_the_line(tmp_path):
    """A bad row in the middle of a JSONL file is reported at its line, blank lines counted."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": 5}\n')
    with pytest.raises(PeftkitError, match=rf"{path}:3\b"):
        load_examples([str(path)])


def test_bom_and_long_fields_load(tmp_path):
    """A BOM (Excel's CSV, Notepad's JSONL) and a 300 000-character field are valid input, not errors."""
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + _jsonl([{"instruction": "a", "output": "b"}], "long-row"))
    assert len(load_examples([str(jsonl)])) == 2
    table = tmp_path / "train.csv"
    table.write_bytes(b"\xef\xbb\xbf" + _csv([{"instruction": "a", "output": "b"}], "long-row"))
    examples = load_examples([str(table)])
    assert [len(e.messages[-1]["content"]) for e in examples] == [1, 300_000]
