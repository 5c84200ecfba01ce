"""`peftkit info` / `peftkit generate` on broken adapter folders: exit status 1 and one short line on stderr
naming the file, never a traceback. Fuzzed in process through `cli.main` (what the console script runs), and a
few cases through the real command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import peftkit
from peftkit import LoraConfig
from peftkit.cli import main
from tests.fuzz.common import FUZZ, json_values
from tests.fuzz.test_safetensors import _damage, damages
from tests.models import tiny_llama
from tests.train.tiny import build_tiny_model


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peftkit.get_peft_model(tiny_llama(), config).save_pretrained(str(folder))
    return folder


config_edits = st.dictionaries(
    st.sampled_from(
        ["peft_type", "r", "target_modules", "task_type", "base_model_name_or_path", "lora_alpha"]
    ),
    json_values,
    max_size=3,
)


def _broken_folder(root, saved, edits: dict, damage) -> tuple:
    folder = root / "my adapter"  # a space in the path, as users have
    folder.mkdir(parents=True)
    config = json.loads((saved / "adapter_config.json").read_text())
    config.update(edits)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = (saved / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(_damage(weights, damage) if damage else weights)
    return folder


def _assert_one_line_error(status: int, err: str, folder) -> None:
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(folder) in lines[0], lines[0]
    assert lines[0].startswith("peftkit "), lines[0]


@FUZZ
@given(edits=config_edits, damage=st.none() | damages)
def test_info_on_a_broken_folder(tmp_path_factory, saved_adapter, capsys, edits, damage):
    folder = _broken_folder(tmp_path_factory.mktemp("cli"), saved_adapter, edits, damage)
    capsys.readouterr()
    status = main(["info", "--adapter", str(folder)])
    out, err = capsys.readouterr()
    if status == 0:
        assert "method" in out and not err
    else:
        _assert_one_line_error(status, err, folder)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_info_and_generate_on_broken_folders(tmp_path, saved_adapter, capsys):
    """A config with a wrong type and a truncated weights file, for `info` and `generate` (on a tiny model);
    `generate` also through the real command in a subprocess."""
    model = build_tiny_model(tmp_path / "model", chat_template=True)
    bad_config = _broken_folder(tmp_path / "a", saved_adapter, {"r": "eight"}, None)
    truncated = _broken_folder(tmp_path / "b", saved_adapter, {}, ("truncate", 300))
    generate = [
        "generate",
        "hi",
        "--model",
        str(model),
        "--max-new-tokens",
        "2",
        "--no-progress",
        "--adapter",
    ]
    for folder in (bad_config, truncated):
        for args in (["info", "--adapter", str(folder)], [*generate, str(folder)]):
            capsys.readouterr()
            status = main(args)
            _assert_one_line_error(status, capsys.readouterr().err, folder)
    for args in (["info", "--adapter", str(bad_config)], [*generate, str(truncated)]):
        result = _run(*args)
        _assert_one_line_error(
            result.returncode, result.stderr, bad_config if args[0] == "info" else truncated
        )
