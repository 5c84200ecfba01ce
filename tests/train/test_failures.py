"""`peftkit train` when things go wrong: NaN loss, a full disk, leftovers of a killed run, an interrupted
evaluation. Each ends with one clear message, and nothing saved before is lost."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit import atomic_files, cli
from peftkit.train import checkpoint as ckpt
from tests.train.test_resume import assert_bit_equal, final_adapter

QUICK = ["--skip-eval-before", "--save-every", "1", "--log-every", "1"]


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(train_args, tmp_path, capsys):
    out = tmp_path / "out"
    # an absurd lr without clipping: step 1 sends the weights to ~1e30, the loss of step 2 is NaN
    args = train_args(out, *QUICK, "--lr", "1e30", "--max-grad-norm", "0", "--warmup", "0")
    assert cli.main([*args, "--scheduler", "constant"]) == 1
    error = last_error_line(capsys)
    assert error.startswith("peftkit train: error: training stopped at step 2/4: the loss is nan")
    assert f"last good checkpoint is {out / 'checkpoints' / 'step-1'}" in error and "--max-grad-norm" in error
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-1"
    weights = load_file(str(out / "checkpoints" / "step-1" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "checkpoints" / "step-2").exists() and not (out / "adapter").exists()


def fail_writes_in(monkeypatch, folder_part: str) -> list[str]:
    """Make every file write whose folder name contains `folder_part` fail with ENOSPC, as a full disk does."""
    real, failed = atomic_files._write_temp, []

    def write_temp(directory, name, data):
        if folder_part in str(directory):
            failed.append(f"{directory}/{name}")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, name, data)

    monkeypatch.setattr(atomic_files, "_write_temp", write_temp)
    return failed


def test_disk_full_while_checkpointing_is_one_clear_error_and_loses_nothing(
    train_args, tmp_path, capsys, monkeypatch
):
    full, out = tmp_path / "full", tmp_path / "out"
    assert cli.main(train_args(full, *QUICK)) == 0
    failed = fail_writes_in(monkeypatch, ".step-3.tmp-")
    assert cli.main(train_args(out, *QUICK)) == 1
    error = last_error_line(capsys)
    assert failed and error.startswith(
        f"peftkit train: error: disk full (No space left on device) while saving {out}"
    )
    assert (
        f"the newest complete checkpoint is {out / 'checkpoints' / 'step-2'}" in error and "--resume" in error
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # no partial copy
    assert ckpt.read_trainer_state(out / "checkpoints" / "step-2")["step"] == 2
    monkeypatch.undo()  # space freed: the run continues where it stopped, exactly
    assert cli.main(train_args(out, *QUICK, "--resume")) == 0
    assert_bit_equal(final_adapter(out), final_adapter(full))


def test_disk_full_while_saving_the_adapter_keeps_the_previous_adapter(
    train_args, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert cli.main(train_args(out, *QUICK)) == 0
    before = final_adapter(out)
    fail_writes_in(monkeypatch, ".adapter.tmp-")
    assert cli.main(train_args(out, *QUICK, "--resume")) == 1  # (finished: resume saves the adapter again)
    error = last_error_line(capsys)
    assert f"while saving {out / 'adapter'}" in error and "keeps its previous contents" in error
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter")]
    assert_bit_equal(final_adapter(out), before)


def test_resume_cleans_up_what_a_killed_save_left_and_says_where_it_continues(train_args, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(train_args(out, *QUICK)) == 0
    root = out / "checkpoints"
    (root / ".step-5.tmp-abc123").mkdir()  # a save killed half-way
    (root / ".step-5.tmp-abc123" / "adapter_model.safetensors").write_bytes(b"partial")
    (root / "step-4" / ckpt.STATE_NAME).write_bytes(b"cut short")  # no longer matches its marker
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 5, "lo')  # a cut row
    capsys.readouterr()
    assert cli.main(train_args(out, *QUICK, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"removed {root / '.step-5.tmp-abc123'}: an incomplete save" in err
    assert f"skipping {root / 'step-4'}: incomplete checkpoint" in err
    assert f"--resume: continuing from {root / 'step-3'}, the newest complete checkpoint" in err
    assert not (root / ".step-5.tmp-abc123").exists() and ckpt.is_complete(root / "step-4")  # redone
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]


def test_resume_before_the_first_checkpoint_starts_from_step_0_and_says_so(train_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # killed right after it created the folder
    assert cli.main(train_args(out, *QUICK, "--resume", "--max-steps", "2")) == 0
    assert (
        f"--resume: no complete checkpoint in {out} (stopped before the first one); starting from step 0"
        in (capsys.readouterr().err)
    )
    assert json.loads((out / "report.json").read_text())["steps"] == 2


def test_interrupted_evaluation_loses_no_training(train_args, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the held-out evaluation after training: the adapter and a final checkpoint are already
    saved; --resume only evaluates."""
    from peftkit.train import loop

    real = loop.held_out_metrics

    def interrupted(*args, **kwargs):
        if args[-1] == "after":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(loop, "held_out_metrics", interrupted)
    assert cli.main(train_args(out, "--skip-eval-before")) == 130
    error = last_error_line(capsys)
    assert "interrupted during the held-out evaluation" in error and "(4/4 steps)" in error
    trained = final_adapter(out)
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-4"
    monkeypatch.undo()
    assert cli.main(train_args(out, "--skip-eval-before", "--resume")) == 0
    assert "training" in capsys.readouterr().err
    assert_bit_equal(final_adapter(out), trained)
    assert json.loads((out / "report.json").read_text())["eval"]["after"]["loss"] > 0


def test_the_kill_hook_rejects_an_unknown_point(monkeypatch):
    from peftkit.train.interrupts import KILL_HOOK, kill_point

    monkeypatch.setenv(KILL_HOOK, "checkpoint:1")
    with pytest.raises(ValueError, match="checkpoint-write"):
        kill_point("forward")


def test_weights_check_tells_inf_and_nan_from_huge_finite_weights(tmp_path):
    from peftkit.train.errors import PeftkitError
    from peftkit.train.loop import stop_if_weights_not_finite

    ok = [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(16, 4))]
    stop_if_weights_not_finite(ok, 3, 5, tmp_path)
    huge = [*ok, torch.nn.Parameter(torch.full((4, 4), 1e30))]  # finite, but their squares overflow fp32
    stop_if_weights_not_finite(huge, 3, 5, tmp_path)
    for bad in (float("inf"), float("nan")):
        broken = torch.randn(16, 4)
        broken[5, 2] = bad
        with pytest.raises(PeftkitError, match="step 3/5: its update made adapter weights inf/NaN"):
            stop_if_weights_not_finite([*ok, torch.nn.Parameter(broken)], 3, 5, tmp_path)
