"""The other `peftkit` commands (generate, eval, merge, info) and the real console entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit import cli
from tests.train.tiny import build_tiny_model, rows, write_jsonl


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"), chat_template=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_chat_model) -> dict:
    """A tiny model, its data, and an adapter trained on it for a few steps."""
    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "rows.jsonl", rows(8))
    out = root / "run"
    code = cli.main(
        [
            "train",
            "--model",
            str(tiny_chat_model),
            "--data",
            str(data),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--r",
            "4",
            "--lr",
            "1e-2",
            "--threads",
            "1",
            "--no-progress",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    return {"model": tiny_chat_model, "data": data, "adapter": out / "adapter", "root": root}


def test_info_describes_the_adapter(trained, capsys):
    assert cli.main(["info", str(trained["adapter"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA" and info["r"] == 4 and info["base_model"] == str(trained["model"])
    assert "q_proj" in info["target_modules"] and info["parameters"] > 0 and info["size_bytes"] > 0


def test_info_on_a_non_adapter_folder(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path)]) == 1
    assert "not an adapter folder" in capsys.readouterr().err


def test_generate_with_two_adapters_and_the_base(trained, capsys):
    adapter = str(trained["adapter"])
    argv = [
        "generate",
        "cat",
        "--model",
        str(trained["model"]),
        "--adapter",
        adapter,
        "--adapter",
        adapter,
        "--base",
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[base", "[0-adapter", "[1-adapter"]
    answers = [line.split("] ", 1)[1] if "] " in line else "" for line in lines]
    base_answer, adapter_answer = _greedy_answers(trained, "cat", 4)
    assert answers == [base_answer, adapter_answer, adapter_answer]  # the models' own greedy answers


def _greedy_answers(trained, prompt: str, max_new: int) -> tuple[str, str]:
    """(base, adapter) greedy answers to `prompt` through the chat template, computed here, not by the CLI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftkit

    tok = AutoTokenizer.from_pretrained(trained["model"])
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    model = peftkit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained["model"]), trained["adapter"]
    )

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    with model.disable_adapter():
        base = answer()
    return base, answer()


def test_generate_interactive_chat(trained, monkeypatch, capsys):
    answers = iter(["hello", "/reset", "again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    argv = [
        "generate",
        "--model",
        str(trained["model"]),
        "--adapter",
        str(trained["adapter"]),
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # one answer per message; after /reset the history is empty again
    assert (
        lines[0] == _greedy_answers(trained, "hello", 3)[1]
        and lines[1] == _greedy_answers(trained, "again", 3)[1]
    )


def test_eval_with_and_without_adapter(trained, capsys):
    base = ["eval", "--model", str(trained["model"]), "--data", str(trained["data"]), "--no-progress"]
    assert cli.main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--adapter", str(trained["adapter"])]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert plain["rows"] == 8 and adapted["correct"] == round(adapted["exact_match"] * 8)
    assert adapted["exact_match"] >= plain["exact_match"]  # trained on these very rows
    assert adapted["loss"] < plain["loss"]  # trained on these very rows
    assert adapted["perplexity"] == pytest.approx(torch.tensor(adapted["loss"]).exp().item(), rel=1e-4)


def test_eval_reports_what_separate_loss_and_generation_passes_give(trained, tmp_path, capsys):
    """`peftkit eval` takes loss and exact match from one pass over each prompt (held_out); the numbers are
    those of the plain response-token loss and of greedy generation of every row, run separately. The
    references of rows 0, 3 and 5 are set to the adapter's own greedy answers, so some rows hit and some miss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftkit
    from peftkit.train import evaluate as ev
    from peftkit.train.data import load_examples, tokenize_all

    tok = AutoTokenizer.from_pretrained(trained["model"])
    base = AutoModelForCausalLM.from_pretrained(trained["model"])
    model = peftkit.PeftModel.from_pretrained(base, trained["adapter"]).eval()
    plain = load_examples([str(trained["data"])])
    answers = [ev.generate_batch(model, tok, [ev.encode_prompt(tok, e)], 8)[0].strip() for e in plain]
    table = rows(8)
    for i in (0, 3, 5):
        table[i]["output"] = answers[i]
    data = write_jsonl(tmp_path / "rows.jsonl", table)
    argv = [
        "eval",
        "--model",
        str(trained["model"]),
        "--data",
        str(data),
        "--adapter",
        str(trained["adapter"]),
    ]
    assert cli.main([*argv, "--batch-size", "3", "--no-progress"]) == 0
    reported = json.loads(capsys.readouterr().out)

    examples = load_examples([str(data)])
    new = ev.default_max_new_tokens(tok, examples)
    generated = [ev.generate_batch(model, tok, [ev.encode_prompt(tok, e)], new)[0].strip() for e in examples]
    hits = sum(g == e.response.strip() for g, e in zip(generated, examples))
    loss = ev.eval_loss(
        model, tokenize_all(tok, examples, 256, "evaluation"), tok.pad_token_id
    )  # --max-length
    assert 3 <= hits < 8 and reported["correct"] == hits
    assert reported["tokens"] == loss["tokens"] and reported["loss"] == pytest.approx(loss["loss"], rel=1e-5)


def test_merge_writes_a_plain_transformers_model(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import peftkit

    out = tmp_path / "merged"
    argv = [
        "merge",
        str(trained["adapter"]),
        "--model",
        str(trained["model"]),
        "--output",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(trained["model"])
    with_adapter = peftkit.PeftModel.from_pretrained(base, str(trained["adapter"])).eval()
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-5)
    assert cli.main(argv) == 1 and "not empty" in capsys.readouterr().err


def test_console_script_end_to_end(trained, tmp_path):
    """The real `peftkit` executable (or `python -m peftkit.cli` when not installed) in a subprocess."""
    exe = shutil.which("peftkit")
    command = [exe] if exe else [sys.executable, "-m", "peftkit.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = tmp_path / "sub"
    train = [
        *command,
        "train",
        "--model",
        str(trained["model"]),
        "--data",
        str(trained["data"]),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
        "--output",
        str(out),
    ]
    done = subprocess.run(train, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        "# peftkit train report" in done.stdout and (out / "adapter" / "adapter_model.safetensors").is_file()
    )
    again = subprocess.run(train, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1].startswith("peftkit train: error: output folder")
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi", "--adapter", "a"],
        ["eval", "--adapter", "a"],
        ["merge", "--adapter", "a", "--output", "m"],
        ["merge", "a", "--output", "m"],  # the older positional form still works
        ["info", "--adapter", "a"],
        ["info", "a"],
    ],
)
def test_every_command_takes_the_adapter_as_adapter_dir(argv):
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    cli._one_adapter(parser, args)
    assert args.adapter in ("a", ["a"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merge", "--output", "m"], "the adapter folder is required: --adapter DIR"),
        (["info", "a", "--adapter", "b"], "two different adapter folders given: --adapter b and a"),
    ],
)
def test_a_missing_or_doubled_adapter_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_run_exits_with_mains_code_after_the_exit_handlers_and_a_flush():
    """`cli.run` (the console script) ends with os._exit: exit handlers must still run and buffered output
    reach the pipe, and the exit status is main's."""
    script = (
        "import atexit, sys\n"
        "from peftkit import cli\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "print('x' * 100000, end='')\n"  # buffered (stdout is a pipe) when run() exits
        "sys.argv = ['peftkit', 'info', '/nonexistent/adapter']\n"
        "cli.run()\n"
        "print('after run')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1
    assert done.stdout == "x" * 100000 + "handler ran\n"
    assert done.stderr.strip().splitlines()[-1].startswith("peftkit info: error: not an adapter folder")
