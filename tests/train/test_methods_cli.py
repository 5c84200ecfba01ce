"""`peftkit train --method <name>` builds and trains every method the CLI lists, end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit import cli
from peftkit.train.methods import METHODS, build_peft_config


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_listed_method_trains_and_saves(method, train_args, tmp_path):
    out = tmp_path / method
    assert cli.main(train_args(out, "--method", method, "--max-steps", "2", "--save-every", "0")) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == METHODS[method].peft_type
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_knobs_reach_the_config():
    cfg = build_peft_config("loha", {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj"]})
    assert isinstance(cfg, peftkit.LoHaConfig) and (cfg.r, cfg.alpha, cfg.module_dropout) == (4, 8, 0.1)
    assert build_peft_config("dora", {"r": 2}).use_dora


def test_adalora_reallocates_ranks_during_cli_training(train_args, tmp_path):
    out = tmp_path / "ada"
    assert cli.main(train_args(out, "--method", "adalora", "--max-steps", "3", "--save-every", "0")) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert pattern and config["init_r"] == 12 and config["target_r"] == 4 and config["total_step"] == 3
    kept = sum(sum(mask) for mask in pattern.values())
    assert kept < 12 * len(pattern)  # the budget shrank from init_r toward target_r
