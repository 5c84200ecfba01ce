"""peftkit.analyze and `peftkit info --analyze`: every number checked against direct torch.linalg computations
on the explicit ΔW (the merged weight minus the base weight)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch

import peftkit
from peftkit import analyze as A

from .models import tiny_llama


def _explicit_deltas(peft_model, name):
    """{module: (ΔW, W)} from merging a copy: merged weight − base weight, in float64."""
    merged = copy.deepcopy(peft_model)
    merged.set_adapter(name)
    base = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items()}
    out = {}
    state = merged.merge_and_unload().state_dict()
    for key, weight in state.items():
        before = base.get(key.replace(".weight", ".base_layer.weight"))
        if before is not None:
            out[key.removesuffix(".weight")] = (weight.double() - before.double(), before.double())
    return out


def _expected(delta, weight):
    delta = delta.reshape(delta.shape[0], -1)
    sigma = torch.linalg.svdvals(delta)
    p = sigma[sigma > sigma.max() * 1e-12]
    p = p / p.sum()
    return {
        "norm": torch.linalg.matrix_norm(delta).item(),
        "relative": (torch.linalg.matrix_norm(delta) / weight.norm()).item(),
        "effective_rank": math.exp(-(p * p.log()).sum().item()),
        "stable_rank": (
            torch.linalg.matrix_norm(delta) ** 2 / torch.linalg.matrix_norm(delta, ord=2) ** 2
        ).item(),
    }


@pytest.mark.parametrize(
    "config",
    [
        peftkit.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}
        ),
        peftkit.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "up_proj"]),
        peftkit.LoHaConfig(r=4, target_modules=["k_proj", "o_proj"]),
        peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]),
        peftkit.AdaLoraConfig(r=4, target_modules=["q_proj"], total_step=10),
    ],
    ids=["lora-factors", "dora", "loha", "oft", "adalora"],
)
def test_stats_match_torch_linalg_on_the_explicit_delta(config):
    torch.manual_seed(0)
    config.init_weights = False
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = False
    peft_model = peftkit.get_peft_model(tiny_llama(), config)
    rows = A.analyze(peft_model, "default")
    explicit = _explicit_deltas(peft_model, "default")
    assert sorted(r["name"] for r in rows) == sorted(explicit)
    for row in rows:
        want = _expected(*explicit[row["name"]])
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (row["name"], key)
    if type(config) is peftkit.LoraConfig and not config.use_dora:  # ranks: 4 for q/down, 2 for v
        assert all(r["effective_rank"] <= (2 if r["module"].endswith("v_proj") else 4) + 1e-6 for r in rows)
        assert {r["layer"] for r in rows} == {0, 1} and "self_attn.q_proj" in {r["module"] for r in rows}
    best = A.largest_change(peft_model, "default")
    assert best["name"] == max(rows, key=lambda r: r["relative"])["name"]
    assert best["relative"] == pytest.approx(max(r["relative"] for r in rows), rel=1e-5)


def test_cosine_of_two_adapters_matches_torch():
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"]
    peft_model = peftkit.get_peft_model(
        tiny_llama(), peftkit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    peft_model.add_adapter(
        "other", peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    rows = A.analyze(peft_model, "default", compare_with="other")
    first, second = _explicit_deltas(peft_model, "default"), _explicit_deltas(peft_model, "other")
    for row in rows:
        if row["module"].endswith("v_proj"):
            assert row["cosine"] is None  # the second adapter does not touch v_proj
            continue
        a, b = first[row["name"]][0].flatten(), second[row["name"]][0].flatten()
        assert row["cosine"] == pytest.approx(
            torch.nn.functional.cosine_similarity(a, b, dim=0).item(), abs=1e-5
        )
    same = A.analyze(peft_model, "default", compare_with="default")
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-6) for r in same)


def test_peftkit_info_analyze_command(tmp_path):
    """`peftkit info --analyze --compare --png` as a subprocess on a saved base and two adapters."""
    from transformers import AutoModelForCausalLM

    from .train.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", chat_template=False)
    for name, seed in [("a", 0), ("b", 1)]:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        config = peftkit.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
        peftkit.get_peft_model(model, config).save_pretrained(tmp_path / name)
    cmd = [sys.executable, "-m", "peftkit.cli", "info", "--adapter", str(tmp_path / "a"), "--analyze"]
    cmd += ["--model", str(model_dir), "--compare", str(tmp_path / "b"), "--png", str(tmp_path / "h.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "cosine" in lines[0] and len(lines) == 1 + 4 + 1  # header, 2 layers x 2 modules, largest change
    assert lines[-1].startswith("largest change: model.layers.")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        cmd[:6] + ["--png", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "--analyze" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
