"""LoraConfig: HF peft's field names and defaults, validation, JSON round trip, unknown keys."""

from __future__ import annotations

import dataclasses
import json

import peft as hf_peft
import pytest

import peftkit
from peftkit.inject import DEFAULT_TARGETS


def test_defaults_match_hf_peft():
    mine, theirs = peftkit.LoraConfig(), hf_peft.LoraConfig()
    for f in dataclasses.fields(mine):
        assert getattr(mine, f.name) == getattr(theirs, f.name), f.name


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1)"),
        ({"bias": "some"}, "bias must be one of ('none', 'all', 'lora_only')"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights must be one of"),
        ({"task_type": "TRANSLATION"}, "task_type 'TRANSLATION' is not one of"),
        ({"layers_pattern": "layers"}, "layers_pattern only applies together with layers_to_transform"),
        ({"rank_pattern": {"q_proj": 0}}, "must be > 0"),
    ],
)
def test_invalid_values_raise_with_what_is_allowed(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        peftkit.LoraConfig(**kwargs)
    assert fragment in str(err.value)


def test_json_round_trip(tmp_path):
    cfg = peftkit.LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        use_dora=True,
        rank_pattern={"v": 2},
        task_type=peftkit.TaskType.CAUSAL_LM,
        init_lora_weights="gaussian",
    )
    cfg.save_pretrained(tmp_path)
    back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, peftkit.LoraConfig) and back == cfg
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    # HF peft reads the same file into the same values
    theirs = hf_peft.PeftConfig.from_pretrained(tmp_path)
    assert theirs.r == 4 and theirs.use_dora and set(theirs.target_modules) == {"q_proj", "v_proj"}


def test_unknown_keys_warn_and_unsupported_features_raise(tmp_path):
    data = peftkit.LoraConfig(r=4).to_dict() | {"some_future_field": 1, "peft_version": "9.9"}
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_field"):
        assert peftkit.PeftConfig.from_pretrained(tmp_path).r == 4
    path.write_text(
        json.dumps(data | {"use_qalora": True})
    )  # (layer_replication is supported since issue 16)
    with pytest.raises(ValueError, match="use_qalora"):
        peftkit.PeftConfig.from_pretrained(tmp_path)


def test_config_errors_name_file_and_key(tmp_path):
    path = tmp_path / "adapter_config.json"
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peftkit.PeftConfig.from_pretrained(tmp_path)
    path.write_text('{"r": 4,\n "peft_type": "LORA",\n oops}')
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON \(line 3"):
        peftkit.PeftConfig.from_pretrained(tmp_path)
    path.write_text('{"r": 4}')
    with pytest.raises(ValueError, match="missing key 'peft_type'"):
        peftkit.PeftConfig.from_pretrained(tmp_path)
    path.write_text('{"peft_type": "NOPE"}')
    with pytest.raises(ValueError, match="key 'peft_type'.*peftkit knows: .*LORA"):
        peftkit.PeftConfig.from_pretrained(tmp_path)
    path.write_text('{"peft_type": "LORA", "r": -1}')
    with pytest.raises(ValueError, match=f"{path}: LoraConfig: r must be"):
        peftkit.PeftConfig.from_pretrained(tmp_path)


def test_default_targets_agree_with_hf_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as HF

    required = [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "phi",
        "gpt2",
        "gpt_neox",
        "gptj",
        "opt",
        "bloom",
        "falcon",
        "bert",
        "roberta",
        "t5",
        "bart",
    ]
    for model_type in required:
        assert model_type in DEFAULT_TARGETS, model_type
    for model_type, targets in DEFAULT_TARGETS.items():
        if model_type in HF:
            assert sorted(targets) == sorted(HF[model_type]), model_type
