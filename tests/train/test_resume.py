"""Ctrl-C and ``--resume`` of real ``peftkit train`` processes: the resumed run is the uninterrupted run;
and ``--resume`` refuses every changed setting that would make it another run.

Each interruption is a real SIGINT that the process sends itself at a chosen step and phase (the
``PEFTKIT_INTERRUPT_AT`` hook), with dropout on, gradient accumulation across an epoch boundary and a
rank-reallocating method, so that any state a checkpoint misses (RNG, data position, optimizer,
allocator) shows up as a difference in the final adapter, compared bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftkit import cli
from peftkit.train import checkpoint as ckpt
from peftkit.train.errors import PeftkitError
from peftkit.train.interrupts import ENV_HOOK
from peftkit.train.loop import micro_batches, prepare_output
from peftkit.train.options import RUN_DEFINING, TrainOptions


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
# epoch boundary and step 2 starts mid-epoch. A metrics row every 2 steps: a resume can land mid-window.
RUN = [
    *("--dropout", "0.1", "--grad-accum", "2", "--max-steps", "5"),
    *("--save-every", "0", "--log-every", "2", "--skip-eval-before"),
]


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
    # same batches, same masks, and a window cut by the interrupt still averages all of its steps
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in expected]


# ---------------------------------------------------------------- which settings --resume may change

# One different, valid value for every setting that changes the math of a run.
CHANGED = {
    "model": "another-model",
    "data": ["other.jsonl"],
    "method": "dora",
    "r": 16,
    "alpha": 32.0,
    "dropout": 0.1,
    "targets": ["q_proj"],
    "batch_size": 4,
    "grad_accum": 2,
    "lr": 1e-3,
    "scheduler": "linear",
    "warmup": 0,
    "seed": 1,
    "max_length": 128,
    "epochs": 2.0,
    "max_steps": 10,
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "eval_split": 0.2,
    "quantize": "4bit",
}
# Settings that only change what is measured, logged or where it goes: a resume may change them.
FREE = {
    "eval_data": ["held-out.jsonl"],
    "eval_limit": 3,
    "skip_eval_before": True,
    "no_eval_cache": True,  # whether the base model's stored metrics may be read back: not the run's math
    "max_new_tokens": 7,
    "save_every": 3,
    "log_every": 2,
    "threads": 2,
    "overwrite": True,
    "fsdp": True,  # shards the frozen base, same math (the process count is checked on its own)
    "gradient_checkpointing": True,  # recomputes activations in the backward: same math, less memory
}
RUN_CONTROL = {"output", "resume"}  # which run, and that it is resumed


def test_every_option_is_classified_for_resume():
    """A new option must be added to RUN_DEFINING (and CHANGED) or to FREE: decide, do not forget."""
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    assert set(RUN_DEFINING) == set(CHANGED)
    assert fields == set(CHANGED) | set(FREE) | RUN_CONTROL


def saved_run(tmp_path, **settings) -> TrainOptions:
    """A run folder (run_config.json + a checkpoint) of a run on --data (and --eval-split, by default)."""
    run = TrainOptions(**{"data": ["train.jsonl"], "eval_split": 0.1, "output": str(tmp_path), **settings})
    ckpt.write_json_atomic(tmp_path / "run_config.json", run.to_dict())
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2" / ckpt.STATE_NAME).write_bytes(b"")
    return dataclasses.replace(run, resume=True)


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_resume_refuses_a_changed_run_setting(name, tmp_path):
    resume = saved_run(tmp_path)
    with pytest.raises(PeftkitError) as err:
        prepare_output(dataclasses.replace(resume, **{name: CHANGED[name]}), tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"different settings: {name} (was {getattr(resume, name)!r}, now {CHANGED[name]!r})" in message


@pytest.mark.parametrize("name", sorted(FREE))
def test_resume_accepts_a_changed_free_setting(name, tmp_path):
    resume = saved_run(tmp_path, eval_split=None)  # (--eval-data would stop a --eval-split: see below)
    prepare_output(dataclasses.replace(resume, **{name: FREE[name]}), tmp_path)


def test_eval_split_counts_only_where_it_picks_the_training_rows(tmp_path):
    resume = saved_run(tmp_path, eval_data=["held-out.jsonl"])
    prepare_output(dataclasses.replace(resume, eval_split=0.3), tmp_path)  # --eval-data wins: no split
    with pytest.raises(PeftkitError, match=r"eval_split \(was None, now 0.3\)"):  # now it splits --data
        prepare_output(dataclasses.replace(resume, eval_split=0.3, eval_data=None), tmp_path)
    with pytest.raises(PeftkitError, match=r"eval_split \(was None, now 0.1\)"):  # the 0.1 starts to split
        prepare_output(dataclasses.replace(resume, eval_data=None), tmp_path)


def test_cli_resume_with_another_max_grad_norm_is_one_line_naming_it(train_args, tmp_path, capsys):
    assert cli.main(train_args(None, "--max-steps", "1", "--skip-eval-before")) == 0
    capsys.readouterr()
    argv = train_args(None, "--max-steps", "1", "--skip-eval-before", "--resume", "--max-grad-norm", "0.5")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_grad_norm (was 1.0, now 0.5)" in err and "Traceback" not in err


def test_adalora_checkpoint_without_allocator_state_is_a_clear_error(train_args, tmp_path, capsys):
    out = tmp_path / "ada"
    args = train_args(
        out, "--method", "adalora", "--max-steps", "3", "--save-every", "1", "--skip-eval-before"
    )
    assert cli.main(args) == 0
    state_file = out / "checkpoints" / "step-2" / ckpt.STATE_NAME
    state = torch.load(state_file, weights_only=False)
    assert {"adapter", "rank_pattern", "tensors", "allocator"} <= set(state["tuner"])
    del state["tuner"]  # as an older peftkit wrote it
    torch.save(state, state_file)
    ckpt.mark_complete(state_file.parent, 2)
    shutil.rmtree(out / "checkpoints" / "step-3")  # the final checkpoint: resume from step 2
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # (after the "model ..." progress line)
    assert error.startswith("peftkit train: error: --resume: ") and "Traceback" not in error
    assert "lacks the AdaLoraModel training state" in error and "--overwrite" in error


@pytest.mark.parametrize("start", [0, 1, 3, 4, 7])
def test_data_stream_resumed_at_a_position_is_the_tail_of_the_whole_stream(start):
    lengths = [5, 9, 2, 7, 7, 3, 8, 1, 4, 6]  # 10 rows of batch 4: 3 batches per epoch, the last one short
    whole = list(itertools.islice(micro_batches(lengths, 4, seed=3), 12))
    assert list(itertools.islice(micro_batches(lengths, 4, seed=3, start=start), 12 - start)) == whole[start:]


def test_adamw_runs_fused_where_every_parameter_allows_it():
    import torch
    from torch import nn

    from peftkit.train.loop import fused_adamw

    def params(device="cpu"):
        torch.manual_seed(0)
        ps = [
            nn.Parameter(torch.randn(8, 16, device=device)),
            nn.Parameter(torch.randn(32, 8, device=device)),
        ]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    assert fused_adamw(params()) is True
    assert fused_adamw(params() + params("meta")) is None  # a parameter fused AdamW cannot step
    assert fused_adamw([nn.Parameter(torch.zeros(2, dtype=torch.float64)), *params()]) is True
    assert fused_adamw([]) is None
    plain, fused = params(), params()
    steps = [
        torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused_adamw(ps) if ps is fused else None)
        for ps in (plain, fused)
    ]
    assert steps[1].defaults["fused"] and not steps[0].defaults["fused"]
    start = [p.detach().clone() for p in plain]
    for _ in range(3):
        for opt in steps:
            opt.step()
    for a, b, a0 in zip(plain, fused, start):  # both moved, the same way
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, a0, atol=1e-3)
