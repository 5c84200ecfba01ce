"""How long `peftkit train` runs: --epochs, --max-steps and config-file values, counted in a real subprocess.

The rule (also in `peftkit train --help` and the README): a value the user gave (flag or config file) is
never overridden by a default; --max-steps, when given, sets the step count and --epochs is not used; with
only --epochs the epochs decide; with neither, the run is 45 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import cli
from peftkit.train.options import load_config_file, make_options

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _train(model: Path, data: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run `python -m peftkit.cli train` on 12 rows, batch 4 (3 batches per epoch); return the logged steps."""
    command = [
        sys.executable,
        "-m",
        "peftkit.cli",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--save-every",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--output",
        str(out),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert json.loads((out / "report.json").read_text())["steps"] == len(steps)
    return done, steps


def test_epochs_alone_decide_the_run_length(tiny_chat_model, data_files, tmp_path):
    _, steps = _train(tiny_chat_model, data_files[0], tmp_path / "o", "--epochs", "2")
    assert steps == [1, 2, 3, 4, 5, 6]  # 2 epochs x 3 batches, not the 45-step default


def test_max_steps_given_with_epochs_sets_the_length_and_says_so(tiny_chat_model, data_files, tmp_path):
    done, steps = _train(tiny_chat_model, data_files[0], tmp_path / "o", "--epochs", "2", "--max-steps", "2")
    assert steps == [1, 2]
    assert "note: --max-steps 2 sets the run length; --epochs 2.0 is not used" in done.stderr


def test_epochs_in_a_config_file_count_as_given(train_args, tmp_path):
    """In process (the subprocess path is covered above): the file's epochs, with no --max-steps anywhere."""
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\n")
    argv = train_args()
    del argv[argv.index("--max-steps") : argv.index("--max-steps") + 2]
    assert cli.main([*argv, "--config", str(config)]) == 0
    assert json.loads((tmp_path / "out/report.json").read_text())["steps"] == 3  # 12 rows / batch 4


@pytest.mark.parametrize(
    ("file_text", "flags", "max_steps", "epochs"),
    [
        ("", {}, 45, 1.0),  # neither given: the bundled run's 45 steps
        ("", {"epochs": 3.0}, None, 3.0),
        ("", {"max_steps": 7}, 7, 1.0),
        ("", {"epochs": 3.0, "max_steps": 7}, 7, 3.0),
        ("max_steps: 7\n", {"epochs": 3.0}, 7, 3.0),  # the file's max_steps is a given value too
        ("epochs: 2\n", {"max_steps": 0}, 0, 2),  # --max-steps 0: the epochs decide
    ],
)
def test_run_length_precedence(tmp_path, file_text, flags, max_steps, epochs):
    config = tmp_path / "c.yaml"
    config.write_text(file_text)
    options = make_options(load_config_file(str(config)), flags)
    assert (options.max_steps, options.epochs) == (max_steps, epochs)


def test_help_states_the_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "decides the run length when --max-steps is not given (with neither flag the run is 45 steps)" in text
    )
    assert "when given, it sets the run length and --epochs is not used" in text
