"""Fixtures for the training application: a tiny random Llama with an offline-built tokenizer, and data."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.train.tiny import build_tiny_model, rows, write_jsonl

# A suite started in the background by a shell without job control (`cmd &` in a script) inherits SIGINT as
# ignored, and Python then installs no KeyboardInterrupt handler, here or in the `peftkit train` processes the
# tests start (an ignored signal stays ignored across exec). The Ctrl-C tests send real SIGINTs: give this
# process Python's own handler, which its children then start from as the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"), chat_template=True)


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


@pytest.fixture
def data_files(tmp_path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "train.jsonl", rows(12)), write_jsonl(tmp_path / "eval.jsonl", rows(4))


@pytest.fixture
def train_args(tiny_chat_model, data_files, tmp_path):
    """Flags for a few-second training run on the tiny model; append more flags as needed."""

    def make(output: Path | None = None, *extra: str) -> list[str]:
        train_file, eval_file = data_files
        return [
            "train",
            "--model",
            str(tiny_chat_model),
            "--data",
            str(train_file),
            "--eval-data",
            str(eval_file),
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--save-every",
            "2",
            "--log-every",
            "1",
            "--r",
            "4",
            "--lr",
            "1e-2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--output",
            str(output or tmp_path / "out"),
            *extra,
        ]

    return make
