"""Loading never runs code from the files it reads: a legacy `adapter_model.bin` is read with
`weights_only=True` (a malicious pickle is refused, its payload never runs), and a base model whose
config.json asks for custom code (`auto_map`) is not executed unless the user passes `trust_remote_code`."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import peftkit
from peftkit import LoraConfig
from peftkit.io import load_weights_file
from tests.models import tiny_llama
from tests.train.tiny import build_tiny_model


class _Payload:
    """Unpickling this calls `os.system`, which would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _malicious_bin(folder, marker) -> None:
    """A legacy adapter folder: a real config, and an adapter_model.bin whose pickle would run a command."""
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(str(folder))
    with open(folder / "adapter_model.bin", "wb") as fh:
        pickle.dump(
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Payload(str(marker))}, fh
        )


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _malicious_bin(tmp_path / "adapter", marker)
    path = tmp_path / "adapter" / "adapter_model.bin"
    with pytest.raises(ValueError, match="weights-only") as info:
        load_weights_file(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="weights-only"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert not marker.exists(), "unpickling ran the payload"


def test_a_plain_bin_still_loads(tmp_path):
    """The guard is weights_only, not a refusal of .bin: a torch.save of tensors loads and matches."""
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    tensors = load_weights_file(str(tmp_path / "adapter_model.bin"))
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors.values())


def _model_asking_for_remote_code(folder, marker) -> None:
    """A tiny model folder whose config.json maps the auto classes to a modeling file that, when imported,
    creates `marker` (what custom code from a stranger's repo could do)."""
    build_tiny_model(folder, chat_template=True)
    (folder / "evil_modeling.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaForCausalLM\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))


def test_custom_model_code_is_not_run(tmp_path):
    """`peftkit generate --model DIR` and `AutoPeftModelForCausalLM` on an adapter recording that base:
    neither imports the folder's code (both load the architecture transformers ships, or refuse)."""
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    _model_asking_for_remote_code(model_dir, marker)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit.cli",
            "generate",
            "hi",
            "--model",
            str(model_dir),
            "--max-new-tokens",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert not marker.exists(), "peftkit generate ran the model folder's custom code"

    adapter = tmp_path / "adapter"
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], base_model_name_or_path=str(model_dir))
    peftkit.get_peft_model(tiny_llama(), config).save_pretrained(str(adapter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peftkit.AutoPeftModelForCausalLM.from_pretrained(str(adapter))
        except Exception as err:  # noqa: BLE001 - refusing is fine; running the code is not
            assert "trust_remote_code" in str(err) or str(model_dir) in str(err), err
    assert not marker.exists(), "AutoPeftModelForCausalLM ran the base model's custom code"

    # the trap is real: asking transformers for remote code runs the file (so the checks above could fail)
    # (in a child process: transformers registers the remote class for every Llama config of the process)
    code = "import sys, transformers as t; t.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code, str(model_dir)], check=True, env=env, timeout=300)
    assert marker.exists()
