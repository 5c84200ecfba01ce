"""Data loading, prompting, labels and batching."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from peftkit.train.data import (
    IGNORE_INDEX,
    Example,
    collate,
    length_grouped_batches,
    load_examples,
    render_prompt,
    split_examples,
    to_example,
    tokenize,
)
from peftkit.train.errors import PeftkitError
from peftkit.train.loop import lr_factor, micro_batches


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module")
def plain_tok(tiny_plain_model):
    return AutoTokenizer.from_pretrained(tiny_plain_model)


def test_alpaca_chat_csv_and_json_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n\n"
    )
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    (tmp_path / "b.json").write_text(json.dumps([chat]))
    (tmp_path / "c.csv").write_text("instruction,input,output\nDouble it,3,6\n")
    examples = load_examples([str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.csv")])
    assert examples[0] == Example(({"role": "user", "content": "Say hi"},), "hi", ("Say hi", ""))
    assert [m["role"] for m in examples[1].messages] == ["system", "user"] and examples[1].response == "4"
    assert examples[2].messages[0]["content"] == "Double it\n\n3" and examples[2].response == "6"


def test_numbers_become_text_and_blank_cells_are_missing():
    assert to_example({"instruction": "Add", "input": 2, "output": 4}, "r").response == "4"
    with pytest.raises(PeftkitError, match="r: missing field.s. output"):
        to_example({"instruction": "Add", "output": float("nan")}, "r")


def test_csv_missing_column_names_row(tmp_path):
    (tmp_path / "c.csv").write_text("instruction,input\nDouble it,3\n")
    with pytest.raises(PeftkitError, match=r"c\.csv:2: missing field\(s\) output"):
        load_examples([str(tmp_path / "c.csv")])


def test_chat_row_without_assistant_turn(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(
        PeftkitError, match=r"b\.jsonl:1: messages need a prompt turn followed by an assistant"
    ):
        load_examples([str(tmp_path / "b.jsonl")])


@pytest.mark.parametrize("which", ["chat_tok", "plain_tok"])
def test_labels_cover_only_the_response(which, request):
    tok = request.getfixturevalue(which)
    example = Example(({"role": "user", "content": "Reverse the word.\n\ncat"},), "tac")
    t = tokenize(tok, example, max_length=512)
    assert t.labels[: t.prompt_len] == [IGNORE_INDEX] * t.prompt_len
    response = tok.decode(t.input_ids[t.prompt_len :])
    assert response.startswith("tac") and response.endswith(tok.eos_token)
    assert tok.decode(t.input_ids[: t.prompt_len]).endswith(
        "<|assistant|>" if which == "chat_tok" else "### Response:\n"
    )


def test_alpaca_prompt_has_bos_and_input_section(plain_tok):
    row = to_example({"instruction": "Reverse the word.\n\nKeep case.", "input": "cat", "output": "tac"}, "r")
    prompt = render_prompt(plain_tok, row)
    assert "### Instruction:\nReverse the word.\n\nKeep case.\n\n### Input:\ncat\n\n### Response:\n" in prompt
    t = tokenize(plain_tok, to_example({"instruction": "Say hi", "output": "hi"}, "r"), 512)
    assert t.input_ids[0] == plain_tok.bos_token_id and "### Input" not in plain_tok.decode(t.input_ids)


def test_truncation_keeps_length_and_drops_rows_without_response(chat_tok):
    example = Example(({"role": "user", "content": "Reverse the word.\n\ncat"},), "tac tac tac tac")
    full = tokenize(chat_tok, example, 512)
    cut = tokenize(chat_tok, example, full.prompt_len + 1)
    assert len(cut.input_ids) == full.prompt_len + 1 and cut.labels[-1] != IGNORE_INDEX
    assert tokenize(chat_tok, example, full.prompt_len) is None


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    lengths = [(i * 37) % 100 + 1 for i in range(200)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=3, mega=4)
    assert sorted(i for b in batches for i in b) == list(range(200))
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    naive = [list(range(s, min(s + 8, 200))) for s in range(0, 200, 8)]
    naive_padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in naive)
    assert padding < naive_padding / 3
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3, mega=4)


def test_micro_batch_stream_resumes_at_the_same_batch():
    lengths = list(range(1, 22))
    full = micro_batches(lengths, 4, seed=0)
    first = [next(full) for _ in range(14)]  # crosses an epoch boundary (6 batches per epoch)
    resumed = micro_batches(lengths, 4, seed=0, start=9)
    assert [next(resumed) for _ in range(5)] == first[9:]


def test_collate_pads_right_by_default_and_left_on_request(chat_tok):
    a = tokenize(chat_tok, Example(({"role": "user", "content": "a"},), "b"), 64)
    b = tokenize(chat_tok, Example(({"role": "user", "content": "a longer prompt"},), "b"), 64)
    right = collate([a, b], pad_id=0)
    assert right["input_ids"].shape == right["labels"].shape == (2, len(b.input_ids))
    assert right["attention_mask"][0, -1] == 0 and right["labels"][0, -1] == IGNORE_INDEX
    left = collate([a, b], pad_id=0, left=True)
    assert left["attention_mask"][0, 0] == 0 and left["input_ids"][0, -1] == a.input_ids[-1]


def test_split_is_reproducible_and_disjoint():
    examples = [Example(({"role": "user", "content": str(i)},), str(i)) for i in range(20)]
    train, held = split_examples(examples, 0.25, seed=1)
    assert (
        len(held) == 5 and len(train) == 15 and not {e.response for e in held} & {e.response for e in train}
    )
    assert split_examples(examples, 0.25, seed=1) == (train, held)
    with pytest.raises(PeftkitError, match="--eval-split"):
        split_examples(examples, 1.5, seed=1)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
        ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),
    ],
)
def test_lr_schedules_warm_up_then_decay(kind, expected):
    factor = lr_factor(kind, warmup=2, total=5)
    assert [factor(s) for s in range(5)] == pytest.approx(expected)


def test_bundled_dataset_shape():
    from peftkit.train.loop import BUNDLED_EVAL, BUNDLED_TRAIN, bundled
    from peftkit.train.make_dataset import generate

    train, held = load_examples([bundled(BUNDLED_TRAIN)]), load_examples([bundled(BUNDLED_EVAL)])
    assert len(train) >= 1000 and len(held) >= 200
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in held}
    regenerated = generate()
    assert [r["output"] for r in regenerated[1]] == [e.response for e in held]  # the committed file is ours


def test_hub_name_without_datasets_installed_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(PeftkitError, match="pip install datasets"):
        load_examples(["tatsu-lab/alpaca"])


def test_unsupported_extension_and_directory(tmp_path):
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(PeftkitError, match=r"unsupported data file type '\.txt'"):
        load_examples([str(tmp_path / "rows.txt")])
    with pytest.raises(PeftkitError, match="got the directory"):
        load_examples([str(tmp_path)])
