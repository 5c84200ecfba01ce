"""Ctrl-C and ``--resume`` of real ``peftkit train`` processes: the resumed run is the uninterrupted run.

Each interruption is a real SIGINT that the process sends itself at a chosen step and phase (the
``PEFTKIT_INTERRUPT_AT`` hook), with dropout on, gradient accumulation across an epoch boundary and a
rank-reallocating method, so that any state a checkpoint misses (RNG, data position, optimizer,
allocator) shows up as a difference in the final adapter, compared bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftkit.train.interrupts import ENV_HOOK


def run_cli(args: list[str], interrupt_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_HOOK}
    if interrupt_at:
        env[ENV_HOOK] = interrupt_at
    return subprocess.run(
        [sys.executable, "-m", "peftkit.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def final_adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_bit_equal(resumed: dict, full: dict) -> None:
    assert resumed.keys() == full.keys()
    diffs = {
        k: (resumed[k].double() - full[k].double()).abs().max().item()
        for k in full
        if resumed[k].shape == full[k].shape
    }
    shapes = {
        k: (tuple(resumed[k].shape), tuple(full[k].shape)) for k in full if resumed[k].shape != full[k].shape
    }
    assert not shapes, f"shapes differ: {shapes}"
    assert all(torch.equal(resumed[k], full[k]) for k in full), f"max |resumed - full| per tensor: {diffs}"


# 12 rows of batch 4 = 3 micro-batches per epoch; 2 micro-batches per step, so steps 1 and 4 straddle an
# epoch boundary and step 2 starts mid-epoch.
RUN = ["--dropout", "0.1", "--grad-accum", "2", "--max-steps", "5", "--save-every", "0", "--skip-eval-before"]


@pytest.mark.parametrize(
    "method, cuts",
    [
        # the forward of step 1 already drew dropout masks; step 3 already updated the weights
        ("lora", ["1:forward", "3:optimizer_step"]),
        # AdaLoRA: the allocator masks ranks every step; its scores and the full-rank tensors must survive
        ("adalora", ["2:optimizer_step"]),
    ],
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(method, cuts, train_args, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = run_cli([*train_args(full), "--method", method, *RUN])
    assert done.returncode == 0, done.stderr
    resume: list[str] = []
    for at in cuts:
        step, phase = at.split(":")
        stopped = run_cli([*train_args(cut), "--method", method, *RUN, *resume], interrupt_at=at)
        assert stopped.returncode == 130, stopped.stderr
        # a step stops before its update, or completes once the update has begun
        step = int(step) + (phase != "forward")
        assert f"interrupted at step {step}/5" in stopped.stderr, stopped.stderr
        assert "Traceback" not in stopped.stderr
        assert (cut / f"checkpoints/step-{step}/trainer_state.pt").is_file()
        resume = ["--resume"]
    finished = run_cli([*train_args(cut), "--method", method, *RUN, "--resume"])
    assert finished.returncode == 0, finished.stderr
    assert_bit_equal(final_adapter(cut), final_adapter(full))
    saved = [json.loads((out / "adapter" / "adapter_config.json").read_text()) for out in (cut, full)]
    assert saved[0].get("rank_pattern") == saved[1].get("rank_pattern")
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in expected]  # same batches, same masks
