"""Datasets for fine-tuning: load rows, turn them into token ids with response-only labels, batch them.

Rows come in two forms, detected per row:

* Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
* chat:   ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}``

Either becomes an :class:`Example`: the prompt messages and the one response the model must learn (the last
assistant turn). Prompts use the tokenizer's chat template when it has one, the Alpaca template otherwise;
labels are -100 on prompt tokens so the loss only covers the response.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.train.errors import PeftkitError

IGNORE_INDEX = -100
ALPACA_FIELDS = ("instruction", "output")
ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


@dataclass(frozen=True)
class Example:
    """One training row: the prompt messages and the response the model should produce."""

    messages: tuple[dict, ...]
    response: str
    alpaca: tuple[str, str] | None = None  # (instruction, input) of an Alpaca row, for the Alpaca template


@dataclass(frozen=True)
class Tokenized:
    """Token ids of prompt + response; ``labels`` is -100 on the prompt. Both have length ``len(input_ids)``."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int


# ---------------------------------------------------------------- loading


def load_examples(sources: list[str]) -> list[Example]:
    """Load and validate rows from files (.json/.jsonl/.csv/.parquet) or ``datasets`` Hub names."""
    examples: list[Example] = []
    for source in sources:
        for where, row in _read_rows(source):
            examples.append(to_example(row, where))
    if not examples:
        raise PeftkitError(f"no rows found in {', '.join(sources)}: the dataset is empty")
    return examples


def _read_rows(source: str) -> list[tuple[str, dict]]:
    """Rows of one source, each with a human location such as ``train.jsonl:12``."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if not path.exists():
        if (
            suffix in {".json", ".jsonl", ".csv", ".parquet"}
            or "/" not in source
            or source.startswith((".", "/"))
        ):
            raise PeftkitError(f"data file not found: {source}")
        return _read_hub(source)
    if path.is_dir():
        raise PeftkitError(f"--data expects a file or a datasets Hub name, got the directory {source}")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise PeftkitError(
        f"unsupported data file type {suffix!r} for {source}; use .json, .jsonl, .csv or .parquet"
    )


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a BOM; anything else is an error naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PeftkitError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8"
        ) from None


def _parse_json(text: str, where: str, whole_file: bool) -> object:
    """``json.loads`` with errors naming ``where`` (the file, or the file and line) and the column; for a
    ``whole_file`` the line of the error is added."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "JSON" if whole_file else "JSON line"
        line = f":{e.lineno}" if whole_file else ""
        raise PeftkitError(f"{where}{line}: malformed {what} ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise PeftkitError(f"{where}: JSON nested too deeply") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    # split on "\n" only (not str.splitlines, which also splits on U+2028 and friends inside strings)
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if line.strip():
            rows.append((f"{path}:{lineno}", _parse_json(line, f"{path}:{lineno}", False)))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    data = _parse_json(_read_text(path), str(path), True)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PeftkitError(
            f"{path}: expected a JSON list of rows (or {{'data': [...]}}), got {type(data).__name__}"
        )
    return [(f"{path} row {i}", row) for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    """Rows keyed by the header, each located by the line its record ends on."""
    # long cells (documents, transcripts) are data, not an error: lift csv's 128 KiB default per field
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((f"{path}:{reader.line_num}", dict(row)))
    except csv.Error as e:
        raise PeftkitError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PeftkitError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise PeftkitError(f"{path}: not a readable parquet file ({e})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_hub(name: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise PeftkitError(
            f"{name!r} is not a file; loading a Hub dataset needs `pip install datasets`"
        ) from None
    split = datasets.load_dataset(name, split="train")
    return [(f"{name} row {i}", row) for i, row in enumerate(split)]


def to_example(row: object, where: str) -> Example:
    """Validate one Alpaca or chat row and turn it into an :class:`Example`."""
    if not isinstance(row, dict):
        raise PeftkitError(
            f"{where}: expected an object with instruction/output or messages, got {type(row).__name__}"
        )
    if "messages" in row:
        return _chat_example(row["messages"], where)
    for key in ("instruction", "input", "output"):
        if isinstance(row.get(key), (list, dict, bool)):
            raise PeftkitError(f"{where}: field {key!r} must be text, got {type(row[key]).__name__}")
    fields = {k: _text(row.get(k)) for k in ("instruction", "input", "output")}
    missing = [k for k in ALPACA_FIELDS if not fields[k]]
    if missing:
        raise PeftkitError(
            f"{where}: missing field(s) {', '.join(missing)}; rows need instruction + output (+ optional input), "
            f"or messages; found keys: {', '.join(map(str, row)) or 'none'}"
        )
    content = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    alpaca = (fields["instruction"], fields["input"])
    return Example(({"role": "user", "content": content},), fields["output"], alpaca)


def _text(value: object) -> str:
    """A cell as stripped text: numbers become text (CSV, JSON); None, NaN and containers become ''."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return str(value)
    return ""


def _chat_example(messages: object, where: str) -> Example:
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
    )
    if not ok:
        raise PeftkitError(f"{where}: messages must be a list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise PeftkitError(
                f"{where}: message {i} needs a string role and string content, got "
                f"{type(m['role']).__name__} and {type(m['content']).__name__}"
            )
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise PeftkitError(f"{where}: messages need a prompt turn followed by an assistant turn")
    response = messages[last]["content"].strip()
    if not response:
        raise PeftkitError(
            f"{where}: the last assistant turn (message {last}) is empty; it is what the model learns"
        )
    prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages[:last])
    return Example(prompt, response)


def split_examples(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the rows (at least one) for evaluation, reproducibly."""
    if not 0.0 < fraction < 1.0:
        raise PeftkitError(f"--eval-split must be between 0 and 1 (exclusive), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise PeftkitError(f"--eval-split {fraction} leaves no training rows out of {len(examples)}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n_eval]]


# ---------------------------------------------------------------- prompting and tokenizing


def render_prompt(tokenizer, example: Example) -> str:
    """The prompt text, ending where the response starts (chat template, else the Alpaca template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(example.messages), add_generation_prompt=True, tokenize=False
        )
    if example.alpaca is not None:
        instruction, inp = example.alpaca
        text = ALPACA_HEADER + f"### Instruction:\n{instruction}\n\n"
        return text + (f"### Input:\n{inp}\n\n" if inp else "") + "### Response:\n"
    turns = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in example.messages)
    return ALPACA_HEADER + turns + "### Response:\n"


def render_response(tokenizer, example: Example, prompt: str) -> str:
    """The text after the prompt: the response plus whatever end-of-turn marker the template adds."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [*example.messages, {"role": "assistant", "content": example.response}], tokenize=False
        )
        if full.startswith(prompt):
            return full[len(prompt) :]
    return example.response + (tokenizer.eos_token or "")


def encode_prompt(tokenizer, example: Example) -> list[int]:
    """Token ids of the prompt."""
    return _prompt_ids(tokenizer, render_prompt(tokenizer, example))


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Tokenize rendered prompt text; the Alpaca path adds BOS (chat templates write their own)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if not getattr(tokenizer, "chat_template", None) and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def tokenize(tokenizer, example: Example, max_length: int) -> Tokenized | None:
    """Prompt + response ids truncated to ``max_length``; None if truncation leaves no response token."""
    prompt = render_prompt(tokenizer, example)
    prompt_ids = _prompt_ids(tokenizer, prompt)
    response_ids = tokenizer(render_response(tokenizer, example, prompt), add_special_tokens=False)[
        "input_ids"
    ]
    ids = (prompt_ids + response_ids)[:max_length]
    if len(ids) <= len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return Tokenized(ids, labels, len(prompt_ids))


def tokenize_all(tokenizer, examples: list[Example], max_length: int, what: str) -> list[Tokenized]:
    """Tokenize every example; rows whose response is cut off entirely are dropped (error if all are)."""
    out = [t for t in (tokenize(tokenizer, e, max_length) for e in examples) if t is not None]
    if not out:
        raise PeftkitError(
            f"every {what} row is longer than --max-length {max_length} before its response starts"
        )
    return out


# ---------------------------------------------------------------- batching


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega: int = 32) -> list[list[int]]:
    """Index batches with little padding: shuffle, sort by length inside mega-batches, shuffle the batches.

    Deterministic in ``seed``, so a resumed run can skip exactly the batches it already trained on.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * mega):
        group = sorted(order[start : start + batch_size * mega], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(items: list[Tokenized], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest item. Returns input_ids / attention_mask / labels, each ``[batch, max_len]``."""
    width = max(len(t.input_ids) for t in items)

    def pad(seq: list[int], fill: int) -> list[int]:
        filler = [fill] * (width - len(seq))
        return filler + seq if left else seq + filler

    ids = [pad(t.input_ids, pad_id) for t in items]
    mask = [pad([1] * len(t.input_ids), 0) for t in items]
    labels = [pad(t.labels, IGNORE_INDEX) for t in items]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }
