"""`generate`/`eval`/`merge` load the base the adapter was trained on (`base_model_name_or_path`).

`--model` overrides it; a different architecture or size is a one-line error naming both models; a relative
`--model ./folder` at training time still works from another folder; the embedded default model's cache
folder is found on this machine (offline) even when the adapter was written with another cache path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit import cli
from tests.train.tiny import build_tiny_model, rows, write_jsonl

SRC = str(Path(__file__).resolve().parents[1] / "src")
TRAIN = [
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--r",
    "4",
    "--lr",
    "1e-2",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory) -> dict:
    """`peftkit train --model ./my-hf-model --output runs/mine` run inside ``work/``, as the README shows."""
    work = tmp_path_factory.mktemp("work")
    build_tiny_model(work / "my-hf-model", chat_template=True)
    write_jsonl(work / "my.jsonl", rows(8))
    old = os.getcwd()
    os.chdir(work)
    try:
        argv = ["train", "--model", "./my-hf-model", "--data", "my.jsonl", *TRAIN, "--output", "runs/mine"]
        assert cli.main(argv) == 0
    finally:
        os.chdir(old)
    return {"work": work, "model": work / "my-hf-model", "adapter": work / "runs/mine/adapter"}


def test_train_records_the_base_as_an_absolute_path(relative_run):
    config = json.loads((relative_run["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(relative_run["model"].resolve())


def test_eval_from_another_folder_uses_the_adapters_base(relative_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = str(relative_run["work"] / "my.jsonl")
    argv = ["eval", "--adapter", str(relative_run["adapter"]), "--data", data, "--no-progress"]
    assert cli.main([*argv, "--no-exact-match"]) == 0
    implicit = json.loads(capsys.readouterr().out)
    assert implicit["base_model"] == str(relative_run["model"].resolve())
    assert cli.main([*argv, "--no-exact-match", "--model", str(relative_run["model"])]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert implicit["loss"] == pytest.approx(explicit["loss"], rel=1e-6)


def test_merge_and_generate_without_model_use_the_adapters_base(relative_run, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    import peftkit

    monkeypatch.chdir(tmp_path)
    adapter = str(relative_run["adapter"])
    assert cli.main(["merge", "--adapter", adapter, "--output", "merged", "--no-progress"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(relative_run["model"])
    expected = peftkit.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    argv = ["generate", "cat", "--adapter", adapter, "--max-new-tokens", "3", "--no-progress"]
    assert cli.main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_model_of_another_size_is_a_one_line_error_naming_both(relative_run, tmp_path, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(relative_run["model"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    adapter = str(relative_run["adapter"])
    for argv in (
        ["eval", "--adapter", adapter, "--model", str(other), "--no-exact-match"],
        ["merge", "--adapter", adapter, "--model", str(other), "--output", str(tmp_path / "m")],
        ["generate", "hi", "--adapter", adapter, "--model", str(other)],
    ):
        assert cli.main([*argv, "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"--model {other} does not match the base model {relative_run['model'].resolve()}" in err
        assert "hidden_size 48 vs 32" in err and "base_model_name_or_path" in err


def test_two_adapters_on_different_bases_are_refused(relative_run, tmp_path, capsys):
    copy = tmp_path / "adapter"
    shutil.copytree(relative_run["adapter"], copy)
    other = tmp_path / "other-model"
    shutil.copytree(relative_run["model"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": str(other)})
    )
    argv = [
        "generate",
        "hi",
        "--adapter",
        str(relative_run["adapter"]),
        "--adapter",
        str(copy),
        "--no-progress",
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"does not match the base model {other}" in err and "num_hidden_layers 2 vs 3" in err


def test_a_missing_recorded_base_names_the_file_and_key(relative_run, tmp_path, capsys):
    copy = tmp_path / "adapter"
    shutil.copytree(relative_run["adapter"], copy)
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": "./gone"})
    )
    assert cli.main(["eval", "--adapter", str(copy), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"peftkit eval: error: {copy / 'adapter_config.json'}: base_model_name_or_path './gone' is not a model "
        "folder here (no config.json); pass --model with the base this adapter was trained on"
    )


def test_the_embedded_default_base_is_found_offline_from_another_cache_path(relative_run, tmp_path):
    """An adapter of the default model written on a machine with another cache path, used here offline."""
    cache = tmp_path / "cache"
    shutil.copytree(
        relative_run["model"], cache / "smollm2-135m-instruct"
    )  # stands in for the embedded model
    copy = tmp_path / "adapter"
    shutil.copytree(relative_run["adapter"], copy)
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    elsewhere = "/home/someone/.cache/peftkit/smollm2-135m-instruct"
    (copy / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": elsewhere})
    )
    env = {**os.environ, "PYTHONPATH": SRC, "PEFTKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    data = str(relative_run["work"] / "my.jsonl")
    command = [sys.executable, "-m", "peftkit.cli", "eval", "--adapter", str(copy), "--data", data]
    done = subprocess.run(
        [*command, "--no-exact-match", "--no-progress"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["base_model"] == str(cache / "smollm2-135m-instruct")


def test_an_unloadable_recorded_hub_base_says_where_it_came_from(relative_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv(
        "HF_HUB_OFFLINE", "1"
    )  # read at import time: the constant itself, too (no network wait)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    copy = tmp_path / "adapter"
    shutil.copytree(relative_run["adapter"], copy)
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    hub_id = "peftkit-tests/no-such-model"
    (copy / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": hub_id})
    )
    assert cli.main(["eval", "--adapter", str(copy), "--no-exact-match", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot load model {hub_id!r}" in err
    assert f"(the base_model_name_or_path of {copy / 'adapter_config.json'}; pass --model" in err


def test_model_flag_works_when_the_recorded_base_has_moved(relative_run, tmp_path, capsys):
    copy = tmp_path / "adapter"
    shutil.copytree(relative_run["adapter"], copy)
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    moved = {**adapter_config, "base_model_name_or_path": str(tmp_path / "moved-away")}
    (copy / "adapter_config.json").write_text(json.dumps(moved))
    argv = ["eval", "--adapter", str(copy), "--model", str(relative_run["model"]), "--no-exact-match"]
    assert cli.main([*argv, "--data", str(relative_run["work"] / "my.jsonl"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["base_model"] == str(relative_run["model"].resolve())


def test_an_older_relative_recorded_base_works_from_the_training_folder(
    relative_run, tmp_path, monkeypatch, capsys
):
    """Adapters written before bases were recorded as absolute paths hold e.g. './my-hf-model'."""
    copy = tmp_path / "adapter"
    shutil.copytree(relative_run["adapter"], copy)
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": "./my-hf-model"})
    )
    monkeypatch.chdir(relative_run["work"])
    argv = ["eval", "--adapter", str(copy), "--data", "my.jsonl", "--no-exact-match", "--no-progress"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["base_model"] == str(relative_run["model"].resolve())
