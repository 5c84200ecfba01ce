"""``peftkit train`` under ``torchrun`` with 2 processes on gloo (tiny Llama): DDP and FSDP2 end with the
adapter one process reaches at twice the batch size; only rank 0 writes; an interrupted 2-process run
resumes to the same adapter; ``--resume`` with another process count is refused.

9 rows at a global batch of 8 make micro-batches of 8 and 1 rows: the 1-row batch leaves one rank without
rows (it runs with weight 0), and grad-accum 2 spans the epoch boundary, so a wrong split of rows, of the
loss normalisation or of the gradient exchange (DDP's no_sync, FSDP2's all-reduce) changes the adapter.
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
from safetensors.torch import load_file

from peftkit.train.interrupts import ENV_HOOK
from tests.train.tiny import rows, write_jsonl

STEPS = 4


def launch(args: list[str], processes: int, interrupt_at: str | None = None) -> subprocess.CompletedProcess:
    """``peftkit train`` as users run it: plain, or under ``torchrun --standalone`` with ``processes``."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_HOOK, "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if interrupt_at:
        env[ENV_HOOK] = interrupt_at
    if processes == 1:
        cmd = [sys.executable, "-m", "peftkit.cli", *args]
    else:  # `--` ends torchrun's own flags (its parser would take peftkit's --r for an abbreviation)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--standalone", "-m", "peftkit.cli", "--", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_chat_model) -> dict[str, Path]:
    """One process at batch 8; 2 processes at batch 4 with DDP (interrupted, then resumed) and FSDP2."""
    root = tmp_path_factory.mktemp("ddp")
    train = write_jsonl(root / "train.jsonl", rows(9))
    held = write_jsonl(root / "eval.jsonl", rows(2))

    def args(out: str, batch: int, *extra: str) -> list[str]:
        return [
            *("train", "--model", str(tiny_chat_model), "--data", str(train), "--eval-data", str(held)),
            *("--max-steps", str(STEPS), "--batch-size", str(batch), "--grad-accum", "2"),
            *("--save-every", "2", "--log-every", "1", "--r", "4", "--lr", "1e-2", "--warmup", "1"),
            *("--threads", "1", "--no-progress", "--max-new-tokens", "2", "--output", str(root / out)),
            *extra,
        ]

    one = launch(args("one", 8), 1)
    assert one.returncode == 0, one.stderr
    cut = launch(args("ddp", 4), 2, interrupt_at="2:step_done")  # SIGINT on both ranks after step 3
    assert cut.returncode != 0 and "interrupted at step 3" in cut.stderr, cut.stderr
    assert (root / "ddp" / "checkpoints" / "step-3").is_dir() and not (root / "ddp" / "adapter").exists()
    resumed = launch(args("ddp", 4, "--resume"), 2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 3" in resumed.stderr
    fsdp = launch(args("fsdp", 4, "--fsdp"), 2)
    assert fsdp.returncode == 0, fsdp.stderr
    wrong_count = launch(args("fsdp", 4, "--resume"), 1)
    return {
        "root": root,
        "one": root / "one",
        "ddp": root / "ddp",
        "fsdp": root / "fsdp",
        "wrong": wrong_count,
        "args": args,
    }


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_reach_the_adapter_of_one_process_at_twice_the_batch(runs, kind):
    one, two = adapter(runs["one"]), adapter(runs[kind])
    assert one.keys() == two.keys() and len(one) > 0
    moved = max(t.abs().max().item() for k, t in one.items() if "lora_B" in k)
    assert moved > 1e-3  # lora_B starts at zero: the runs really trained
    worst = {k: (one[k] - two[k]).abs().max().item() for k in one}
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=0) for k in one), worst
    # the logged losses are the global ones too, not rank 0's half
    losses = {name: [r["loss"] for r in metrics(runs[name]) if "loss" in r] for name in ("one", kind)}
    assert losses["one"] == pytest.approx(losses[kind], abs=1e-5)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_rank_zero_writes_every_file_once(runs, kind):
    out = runs[kind]
    rows_ = metrics(out)
    train_steps = [r["step"] for r in rows_ if "loss" in r]
    assert train_steps == list(range(1, STEPS + 1))  # no duplicate line from rank 1, none lost on resume
    assert [r["step"] for r in rows_ if "eval_loss" in r] == [0, STEPS]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "adapter", "checkpoints", "loss_curve.png", "metrics.jsonl", "report.json", "report.md", "run_config.json"
    ]  # fmt: skip
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    report = json.loads((out / "report.json").read_text())
    assert (report["processes"], report["batch_size"], report["global_batch"]) == (2, 4, 16)
    assert report["distributed"] == ("FSDP2" if kind == "fsdp" else "DDP")
    assert "4 rows per process x 2 accumulated x 2 process(es)" in (out / "report.md").read_text()
    assert json.loads((out / "run_config.json").read_text())["processes"] == 2


def test_report_measures_the_whole_weights(runs):
    """The report's largest ‖ΔW‖/‖W‖ is the one-process value under DDP and FSDP2 (not a shard's)."""
    one = json.loads((runs["one"] / "report.json").read_text())["largest_change"]
    for kind in ("ddp", "fsdp"):
        got = json.loads((runs[kind] / "report.json").read_text())["largest_change"]
        assert got["name"] == one["name"], kind
        assert got["relative"] == pytest.approx(one["relative"], rel=1e-3), kind


def test_fsdp_shards_the_frozen_base(runs):
    whole = json.loads((runs["ddp"] / "report.json").read_text())["base_params_per_process"]
    shard = json.loads((runs["fsdp"] / "report.json").read_text())["base_params_per_process"]
    single = json.loads((runs["one"] / "report.json").read_text())["base_params_per_process"]
    assert whole == single  # DDP: a full copy per process
    assert shard <= whole // 2 + 64  # FSDP2: about half of it (dim-0 shards, rounded up)


def test_a_finished_run_continues_with_a_larger_max_steps(runs, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(runs["ddp"], out)  # a finished 2-process run (itself resumed once)
    assert (out / "checkpoints" / f"step-{STEPS}").is_dir()  # the last step is a checkpoint too
    args = runs["args"]("unused", 4, "--resume", "--max-steps", str(STEPS + 2))
    args[args.index("--output") + 1] = str(out)
    more = launch(args, 2)
    assert more.returncode == 0, more.stderr
    assert f"resuming at step {STEPS} from" in more.stderr
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 3))
    assert json.loads((out / "report.json").read_text())["steps"] == STEPS + 2
    grown = adapter(out)
    assert any(not torch.equal(grown[k], t) for k, t in adapter(runs["ddp"]).items())


def test_resume_with_another_process_count_is_refused(runs):
    done = runs["wrong"]
    assert done.returncode != 0
    assert "trained with 2 process(es)" in done.stderr and "now 1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


TRAINER_SCRIPT = Path(__file__).resolve().parents[1] / "ddp_trainer_script.py"


def run_trainer(model: Path, out: Path, batch: int, processes: int) -> subprocess.CompletedProcess:
    args = [str(TRAINER_SCRIPT), "--model", str(model), "--output", str(out), "--batch-size", str(batch)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, *args]
    if processes > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--standalone",
        ]
        cmd += args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_trainer_under_torchrun_ddp_equals_one_process_at_twice_the_batch(tiny_chat_model, tmp_path):
    """transformers.Trainer on a peftkit model, 2 processes (DDP over gloo) at per-device batch 2 vs one
    process at 4: the same adapter, written once by rank 0 with trainer.save_model."""
    one = run_trainer(tiny_chat_model, tmp_path / "one", 4, 1)
    assert one.returncode == 0, one.stderr
    two = run_trainer(tiny_chat_model, tmp_path / "two", 2, 2)
    assert two.returncode == 0, two.stderr
    assert "world 2; model run through DistributedDataParallel" in two.stdout
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


def test_dora_under_fsdp_matches_one_process(runs):
    """DoRA's magnitude and the report's dense ΔW (merged weight minus W) under FSDP2's sharded tensors:
    the run finishes and gives the one-process adapter and report."""
    one = launch(runs["args"]("dora-one", 8, "--method", "dora", "--max-steps", "2"), 1)
    two = launch(runs["args"]("dora-fsdp", 4, "--method", "dora", "--max-steps", "2", "--fsdp"), 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = adapter(runs["root"] / "dora-one"), adapter(runs["root"] / "dora-fsdp")
    assert a.keys() == b.keys() and any("magnitude" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    reports = [json.loads((runs["root"] / d / "report.json").read_text()) for d in ("dora-one", "dora-fsdp")]
    assert reports[1]["largest_change"]["name"] == reports[0]["largest_change"]["name"]
    assert reports[1]["largest_change"]["relative"] == pytest.approx(
        reports[0]["largest_change"]["relative"], rel=1e-3
    )
