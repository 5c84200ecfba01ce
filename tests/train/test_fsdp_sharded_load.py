"""``peftkit train --fsdp`` on 2 processes loads the frozen base sharded: rank 0 alone reads the checkpoint,
rank 1 builds the model on ``meta`` and receives only its shards, and the run still ends with the adapter one
process reaches at twice the batch (tied embeddings and rotary tables right: equal losses from step 0).

The model is a random Llama of 12.6M parameters (50 MB in fp32) with tied input/output embeddings, big enough
for the memory of the loading to show next to the ~400 MB of torch and transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.tiny import build_tiny_model, rows, write_jsonl

PROBE = Path(__file__).resolve().parent / "fsdp_load_probe.py"


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    """The tiny tokenizer with a wider, tied 4-layer Llama (non-default rope_theta, so a rotary table built
    from defaults instead of config.json would show in the losses)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = build_tiny_model(tmp_path_factory.mktemp("tied"), chat_template=True)
    small = json.loads((folder / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=small["vocab_size"],
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rope_theta=500.0,
        tie_word_embeddings=True,
        pad_token_id=small["pad_token_id"],
        bos_token_id=small["bos_token_id"],
        eos_token_id=small["eos_token_id"],
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tied_model) -> dict:
    """One process at batch 8; 2 FSDP2 processes at batch 4 under the probe (per-rank loading records)."""
    root = tmp_path_factory.mktemp("fsdp-load")
    train = write_jsonl(root / "train.jsonl", rows(9))
    held = write_jsonl(root / "eval.jsonl", rows(2))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PEFTKIT_PROBE_DIR"] = str(root)

    def args(out: str, batch: int, *extra: str) -> list[str]:
        return [
            *("train", "--model", str(tied_model), "--data", str(train), "--eval-data", str(held)),
            *("--max-steps", "2", "--batch-size", str(batch), "--log-every", "1", "--save-every", "0"),
            *("--r", "4", "--lr", "1e-3", "--warmup", "1", "--threads", "1", "--no-progress"),
            *("--max-new-tokens", "2", "--output", str(root / out), *extra),
        ]

    one = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", *args("one", 8)], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(PROBE)]
    two = subprocess.run([*cmd, "--", *args("fsdp", 4, "--fsdp")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    probes = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"one": root / "one", "fsdp": root / "fsdp", "probes": probes, "model": tied_model}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_only_rank_zero_reads_the_checkpoint(runs):
    rank0, rank1 = runs["probes"]
    weights = str(runs["model"] / "model.safetensors")
    assert weights in rank0["opened"] and rank0["from_pretrained"] == 1  # the probe sees a real load
    assert rank1["opened"] == [] and rank1["from_pretrained"] == 0


def test_rank_one_holds_only_its_shards(runs):
    """Rank 1's base parameters are half of the model, and loading raised its peak memory by half the model
    less than rank 0's (each measured from its resident memory just before loading)."""
    full = sum(
        t.numel() * t.element_size() for t in load_file(str(runs["model"] / "model.safetensors")).values()
    )
    rank0, rank1 = runs["probes"]
    assert rank1["base_param_bytes_here"] == pytest.approx(full / 2, rel=0.01)
    grew = [(p["peak_after_wrap_mb"] - p["rss_before_load_mb"]) * 2**20 for p in (rank0, rank1)]
    assert grew[0] > 0.9 * full, grew  # rank 0 held the whole model
    # rank 1 grew by its half less (plus the same ~30 MB of tokenizer, data and adapter as rank 0); when every
    # rank loaded the whole model (before sharded loading) the two grew alike
    assert grew[0] - grew[1] > 0.4 * full, grew


def test_tied_embeddings_and_rotary_tables_are_right_on_every_rank(runs):
    rank0, rank1 = runs["probes"]
    assert rank0["tied"] and rank1["tied"]
    assert rank1["inv_freq"] == rank0["inv_freq"]
    head_dim = 512 // 8
    expected = 1.0 / (500.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert torch.allclose(torch.tensor(rank1["inv_freq"]), expected)
    # the base's held-out loss (step 0, before any update) and every step's loss are one process's
    one, two = metrics(runs["one"]), metrics(runs["fsdp"])
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a, b)


def test_sharded_loading_reaches_the_adapter_of_one_process(runs):
    one = load_file(str(runs["one"] / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(runs["fsdp"] / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    assert max(t.abs().max().item() for k, t in one.items() if "lora_B" in k) > 1e-4  # it trained
    worst = {k: (one[k] - two[k]).abs().max().item() for k in one}
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=0) for k in one), worst
