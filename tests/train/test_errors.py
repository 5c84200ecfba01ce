"""Bad input to `peftkit train`: one line on stderr naming the culprit, exit status 1, no traceback."""

from __future__ import annotations

import json

import pytest

from peftkit import cli


def run_error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # earlier lines, if any, are progress messages of the run so far
    assert "Traceback" not in err and last.startswith("peftkit train: error: "), err
    return last


def test_malformed_jsonl_names_file_and_line(train_args, data_files, capsys):
    train_file, _ = data_files
    lines = train_file.read_text().splitlines()
    lines[2] = '{"instruction": "oops", '
    train_file.write_text("\n".join(lines) + "\n")
    err = run_error(train_args(), capsys)
    assert f"{train_file}:3: malformed JSON line" in err


def test_row_missing_fields_names_fields_and_row(train_args, data_files, capsys):
    train_file, _ = data_files
    with train_file.open("a") as f:
        f.write(json.dumps({"instruction": "no answer here"}) + "\n")
    err = run_error(train_args(), capsys)
    assert f"{train_file}:13: missing field(s) output" in err


def test_empty_dataset(train_args, data_files, capsys):
    data_files[0].write_text("\n")
    assert "the dataset is empty" in run_error(train_args(), capsys)


def test_unknown_model_path(train_args, tmp_path, capsys):
    argv = train_args()
    argv[argv.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert "model not found" in run_error(argv, capsys)


def test_non_empty_output_needs_overwrite(train_args, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something.txt").write_text("precious")
    err = run_error(train_args(), capsys)
    assert "already holds files" in err and "--overwrite" in err
    assert (tmp_path / "out" / "something.txt").read_text() == "precious"


def test_unknown_config_key_lists_valid_keys(train_args, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.1\n")
    err = run_error([*train_args(), "--config", str(config)], capsys)
    assert "unknown config key 'learning_rate'" in err and "lr" in err and "max_steps" in err


def test_missing_data_file(train_args, tmp_path, capsys):
    argv = train_args()
    argv[argv.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    assert "data file not found" in run_error(argv, capsys)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--method", "prefix", "unknown --method 'prefix'"),
        ("--scheduler", "wavy", "--scheduler must be"),
        ("--batch-size", "0", "--batch-size must be a positive integer"),
    ],
)
def test_bad_flag_values(train_args, flag, value, message, capsys):
    assert message in run_error([*train_args(), flag, value], capsys)


def test_unknown_target_module_is_one_line(train_args, capsys):
    err = run_error([*train_args(), "--targets", "no_such_proj"], capsys)
    assert "no_such_proj" in err


def test_debug_shows_the_traceback(train_args, data_files):
    data_files[0].write_text("\n")
    from peftkit.train.errors import PeftkitError

    with pytest.raises(PeftkitError):
        cli.main([*train_args(), "--debug"])
