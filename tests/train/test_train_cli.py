"""`peftkit train` end to end on a tiny random Llama: artifacts, resume, Ctrl-C, config files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit import cli

ARTIFACTS = [
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "run_config.json",
    "metrics.jsonl",
    "loss_curve.png",
    "report.md",
    "report.json",
    "checkpoints/step-2/trainer_state.pt",
    "checkpoints/step-2/adapter_model.safetensors",
]


def test_train_writes_every_artifact(train_args, tmp_path, capsys):
    assert cli.main(train_args()) == 0
    out = tmp_path / "out"
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and 0 < report["trainable_percent"] < 100
    assert report["adapter_bytes"] > 0 and report["peak_rss_mb"] > 0 and report["tokens_per_second"] > 0
    assert set(report["eval"]) == {"before", "after", "exact_match_before", "exact_match_after"}
    assert report["eval"]["after"]["loss"] < report["eval"]["before"]["loss"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert {"lr", "tokens_per_s"} <= set(rows[1]) and "eval_loss" in rows[0] and "eval_loss" in rows[-1]
    assert "held-out exact match" in capsys.readouterr().out
    # where the time went: every phase, in order; the run's own phases add up to its wall time
    phases = report["phases"]
    assert list(phases) == [
        "startup",
        "model_load",
        "tokenize",
        "eval_before",
        "training",
        "eval_after",
        "report",
    ]
    assert all(v >= 0 for v in phases.values()) and phases["startup"] > 0  # imports take time (Linux)
    assert sum(v for k, v in phases.items() if k != "startup") == pytest.approx(
        report["wall_seconds"], abs=0.5
    )
    assert "- seconds by phase: startup " in (out / "report.md").read_text()


def test_alpaca_template_and_eval_split(tiny_plain_model, data_files, tmp_path):
    train_file, _ = data_files
    code = cli.main(
        [
            "train",
            "--model",
            str(tiny_plain_model),
            "--data",
            str(train_file),
            "--eval-split",
            "0.25",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--threads",
            "1",
            "--no-progress",
            "--method",
            "dora",
            "--targets",
            "q_proj",
            "v_proj",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    config = json.loads((tmp_path / "o/adapter/adapter_config.json").read_text())
    assert config["use_dora"] is True and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((tmp_path / "o/report.json").read_text())["eval"]["exact_match_after"]["total"] == 3


def _adapter(folder):
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_ctrl_c_saves_checkpoint_and_resume_matches_uninterrupted_run(
    train_args, tmp_path, monkeypatch, capsys
):
    assert cli.main(train_args(tmp_path / "full")) == 0

    clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def interrupt_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt_on_third_step)
    assert cli.main(train_args(tmp_path / "cut")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2/4" in err and "--resume" in err and "Traceback" not in err
    assert (tmp_path / "cut/checkpoints/step-2/trainer_state.pt").is_file()
    assert not (tmp_path / "cut/adapter").exists()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)

    assert cli.main(train_args(tmp_path / "cut", "--resume")) == 0
    assert json.loads((tmp_path / "cut/report.json").read_text())["steps"] == 4
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 4]  # eval at 0, train rows 1-4, eval at the end: no duplicates


def test_resume_with_changed_settings_is_refused(train_args, tmp_path, capsys):
    assert cli.main(train_args()) == 0
    assert cli.main(train_args(None, "--resume", "--r", "8")) == 1
    assert "different settings: r (was 4, now 8)" in capsys.readouterr().err


def test_skip_eval_before_measures_the_trained_model_only(train_args, tmp_path):
    assert cli.main([*train_args(), "--skip-eval-before", "--max-steps", "2"]) == 0
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["eval"]["before"] is None and report["eval"]["exact_match_before"] is None
    assert report["eval"]["after"]["loss"] > 0 and report["eval"]["exact_match_after"]["total"] > 0
    assert "eval loss: not measured ->" in (tmp_path / "out/report.md").read_text()
    rows = [json.loads(x) for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]  # no step-0 (base model) row


def test_config_file_sets_options_and_flags_override(train_args, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\nweight_decay: 0.01\nscheduler: linear\n")
    assert cli.main([*train_args(), "--config", str(config), "--max-steps", "2"]) == 0
    saved = json.loads((tmp_path / "out/run_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["weight_decay"] == 0.01 and saved["scheduler"] == "linear"


def test_overwrite_replaces_an_existing_run(train_args, tmp_path):
    assert cli.main(train_args()) == 0
    assert cli.main([*train_args(), "--overwrite", "--max-steps", "2"]) == 0
    assert json.loads((tmp_path / "out/report.json").read_text())["steps"] == 2
    # the old run's checkpoints are gone; the new run's final checkpoint is step 2
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == ["step-2"]


@pytest.mark.parametrize("flag", ["--help"])
def test_every_flag_has_help(flag, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", flag])
    text = capsys.readouterr().out
    for option in [
        "--model",
        "--data",
        "--method",
        "--r",
        "--alpha",
        "--targets",
        "--resume",
        "--config",
        "--debug",
    ]:
        assert option in text
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}"


def _fail_in_optimizer(monkeypatch):
    def step(self, *args, **kwargs):
        raise RuntimeError("The size of tensor a (12) must match\nthe size of tensor b (10)")

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_an_unexpected_training_error_is_one_line_with_its_type_and_place(train_args, monkeypatch, capsys):
    _fail_in_optimizer(monkeypatch)
    assert cli.main([*train_args(), "--skip-eval-before"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "peftkit train: error: RuntimeError: The size of tensor a (12) must match the size of tensor b (10) (at "
    ), last
    assert "test_train_cli.py:" in last and last.endswith(" in step; rerun with --debug for the traceback)")


def test_debug_shows_the_traceback_of_an_unexpected_error(train_args, monkeypatch):
    _fail_in_optimizer(monkeypatch)
    with pytest.raises(RuntimeError, match="size of tensor a"):
        cli.main([*train_args(), "--skip-eval-before", "--debug"])


def test_value_errors_from_other_libraries_keep_their_type():
    try:
        torch.zeros(2).view(3)
    except RuntimeError as e:
        assert cli.describe_error(e).startswith("RuntimeError: shape '[3]' is invalid")
    try:
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    except ValueError as e:
        text = cli.describe_error(e)
        assert text.startswith("ValueError: Expected input batch_size (2) to match target batch_size (3)")
        assert "(at torch/nn/functional.py:" in text


def test_gradient_checkpointing_recomputes_and_reaches_the_same_adapter(train_args, tmp_path, monkeypatch):
    """--gradient-checkpointing recomputes the decoder layers in the backward (each layer's forward runs once
    more per training step) and ends with the adapter of the plain run (dropout 0: the recomputed forward is
    the same computation); --no-gradient-checkpointing keeps it off."""
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    real = (
        modeling_llama.LlamaMLP.forward
    )  # inside each checkpointed layer (the layer's own forward is wrapped)

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    adapters, forwards = {}, {}
    for name, flag in (("plain", "--no-gradient-checkpointing"), ("ckpt", "--gradient-checkpointing")):
        calls["n"] = 0
        assert cli.main([*train_args(tmp_path / name), "--dropout", "0", "--skip-eval-before", flag]) == 0
        adapters[name] = load_file(tmp_path / name / "adapter/adapter_model.safetensors")
        forwards[name] = calls["n"]
        assert json.loads((tmp_path / name / "run_config.json").read_text())["gradient_checkpointing"] == (
            name == "ckpt"
        )
    layers, steps = 2, 4  # tests/train/tiny.py: 2 decoder layers; --max-steps 4, one batch per step
    assert forwards["ckpt"] - forwards["plain"] == layers * steps
    assert adapters["plain"].keys() == adapters["ckpt"].keys()
    for key, value in adapters["plain"].items():
        torch.testing.assert_close(adapters["ckpt"][key], value, rtol=1e-4, atol=1e-5)


def test_base_model_metrics_are_measured_once_per_model_rows_and_settings(
    train_args, tiny_chat_model, tmp_path, monkeypatch
):
    """eval_cache: a second run on the same model files, held-out rows and settings reads the base model's
    metrics back instead of evaluating it again; any of those changing (or --no-eval-cache) measures again."""
    import os

    from peftkit.train import loop

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    measured = []
    real = loop.held_out_metrics

    def counting(*args, **kwargs):
        measured.append(args[-1])  # "before" / "after"
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "held_out_metrics", counting)

    def run(name: str, *extra: str) -> dict:
        measured.clear()
        assert cli.main(train_args(tmp_path / name, "--max-steps", "1", *extra)) == 0
        return json.loads((tmp_path / name / "report.json").read_text())

    first = run("first")
    assert measured == ["before", "after"] and first["eval_before_cached"] is None
    stored = list((tmp_path / "cache" / "eval").glob("*.json"))
    assert len(stored) == 1
    second = run("second")
    assert measured == ["after"]  # the base model was not evaluated again
    assert second["eval"]["before"] == first["eval"]["before"]
    assert second["eval"]["exact_match_before"] == first["eval"]["exact_match_before"]
    assert (
        second["eval_before_cached"]
        and "measured by an earlier run" in (tmp_path / "second" / "report.md").read_text()
    )
    # measured again: when asked to, with other held-out rows, on changed model files
    again = run("again", "--no-eval-cache")
    assert measured == ["before", "after"] and again["eval_before_cached"] is None
    assert again["eval"]["before"]["loss"] == pytest.approx(first["eval"]["before"]["loss"], rel=1e-6)
    run("fewer_rows", "--eval-limit", "3")
    assert measured == ["before", "after"]
    config = tiny_chat_model / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    run("touched")
    assert measured == ["before", "after"]
    run("touched_again")
    assert measured == ["after"]
    # an unreadable stored file counts as missing and is replaced
    for file in (tmp_path / "cache" / "eval").glob("*.json"):
        file.write_text("{not json")
    run("corrupt")
    assert measured == ["before", "after"]
    run("repaired")
    assert measured == ["after"]
