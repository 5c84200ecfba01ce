"""Every `peftkit ...` command line shown in README.md and docs/*.md, run as written.

Fenced shell blocks are run for real, in order, as subprocesses of the installed `peftkit` executable in a
temporary folder holding the files they name (`./my-hf-model`, `my.jsonl`, `held_out.jsonl`); the embedded
default model is stood in for by a tiny random Llama in `$PEFTKIT_CACHE`, so `peftkit train` with no
arguments runs the bundled job, shape for shape, in seconds. Only paths are substituted, never flags: a
command line that stops parsing or fails fails this test. Inline `peftkit ...` spans in the prose, which may
hold placeholders such as `<m>`, must at least parse.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import cli
from tests.train.tiny import build_tiny_model, rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`(peftkit [^`]+)`")
PLACEHOLDERS = {"<m>": "lora", "<lr>": "2e-3"}


def _logical_lines(block: str, first_line: int):
    """(line number, text) of each shell command line; a quoted string may span several lines."""
    pending, start = "", first_line
    for number, line in enumerate(block.splitlines(), first_line):
        if not pending:
            start = number
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command continues on the next line
            continue
        yield start, pending
        pending = ""
    assert not pending, f"unclosed quote in the shell block starting at line {first_line}"


def _commands(line: str) -> list[list[str]]:
    """The argv of each `peftkit` command in a shell line (commands joined by &&, ||, ; or |)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c[1:] for c in commands if c and c[0] == "peftkit"]


def shown_commands() -> list[tuple[str, list[str]]]:
    """("README.md:42", argv after `peftkit`) for every command line in a fenced shell block of the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) not in ("", "bash", "sh", "shell", "console"):
                continue
            first = text.count("\n", 0, match.start(2)) + 1
            for number, line in _logical_lines(match.group(2), first):
                found += [(f"{doc.name}:{number}", argv) for argv in _commands(line)]
    return found


def inline_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for span in INLINE.findall(line):
                for key, value in PLACEHOLDERS.items():
                    span = span.replace(key, value)
                found.append((f"{doc.name}:{number}", shlex.split(span)[1:]))
    return found


def test_the_readme_shows_every_command():
    """Guards the extraction itself: the README's command lines are found, with their flags."""
    commands = {argv[0] for _, argv in shown_commands()}
    assert {"train", "generate", "eval", "merge", "info"} <= commands


@pytest.mark.parametrize(("where", "argv"), inline_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_inline_command_spans_parse(where, argv):
    parser = cli.build_parser()
    try:
        cli._one_adapter(parser, parser.parse_args(argv))
    except SystemExit as e:
        pytest.fail(f"{where}: `peftkit {shlex.join(argv)}` does not parse (exit {e.code})")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    """A folder with the files the README's commands name, and a tiny stand-in for the embedded model."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    build_tiny_model(work / "my-hf-model", chat_template=True)
    default = _resized_copy(work / "my-hf-model", root / "cache" / "smollm2-135m-instruct", hidden_size=48)
    write_jsonl(work / "my.jsonl", rows(12))
    write_jsonl(work / "held_out.jsonl", rows(4))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "PEFTKIT_CACHE": str(default.parent),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return {"work": work, "env": env}


def _resized_copy(source: Path, target: Path, hidden_size: int) -> Path:
    """The tiny model's tokenizer with a random model of another width: the default model's stand-in must
    differ from ./my-hf-model, so loading the wrong base for an adapter fails instead of passing unnoticed."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.hidden_size, config.head_dim = hidden_size, hidden_size // config.num_attention_heads
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def test_every_readme_command_runs_as_written(workdir):
    exe = shutil.which("peftkit")
    prefix = [exe] if exe else [sys.executable, "-m", "peftkit.cli"]
    for where, argv in shown_commands():
        if argv[0] == "serve":
            _check_server_starts(where, [*prefix, *argv], workdir)
            continue
        done = subprocess.run(
            [*prefix, *argv],
            cwd=workdir["work"],
            env=workdir["env"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        shown = f"{where}: `peftkit {shlex.join(argv)}`"
        assert done.returncode == 0, f"{shown} exited {done.returncode}:\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"{shown} printed nothing"
    work = workdir["work"]
    assert (work / "runs/peftkit-train/adapter/adapter_model.safetensors").is_file()
    assert (work / "merged-model/config.json").is_file()
    mine = json.loads((work / "runs/mine/report.json").read_text())
    assert mine["steps"] == 2 * math.ceil(mine["train_rows"] / 8)  # --epochs 2 at the default batch of 8


def _check_server_starts(where: str, command: list[str], workdir: dict) -> None:
    """`peftkit serve ...` runs until stopped: it must answer /v1/models with the adapters it was given."""
    import time

    import httpx

    argv = command[command.index("serve") + 1 :]
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
    names = [a.split("=", 1)[0] for flag, a in zip(argv, argv[1:]) if flag == "--adapter" and "=" in a]
    proc = subprocess.Popen(
        command, cwd=workdir["work"], env=workdir["env"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                served = [m["id"] for m in models["data"]]
                assert set(names) <= set(served), f"{where}: serving {served}, expected {names}"
                return
            except httpx.HTTPError:
                time.sleep(0.5)
        pytest.fail(
            f"{where}: `peftkit {shlex.join(argv)}` did not answer: {proc.stderr.read()[-3000:] if proc.poll() is not None else 'timeout'}"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
