"""The ``peftkit`` command: ``train``, ``generate``, ``eval``, ``merge`` and ``info``.

The command depends on the library, never the reverse. Every error surfaces as one line on stderr and a
non-zero exit: a user mistake as its message, anything unexpected with its type, message and the file:line
that raised it; ``--debug`` shows the traceback instead. Every command takes an adapter as ``--adapter DIR``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import traceback
from pathlib import Path

from peftkit.train.errors import PeftkitError

EPILOG = "Run `peftkit train` with no arguments to fine-tune the embedded SmolLM2-135M-Instruct on the bundled dataset."


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainOptions field; defaults stay None so a config file value is only overridden when given."""
    from peftkit.train.options import FIELDS

    for name, f in FIELDS.items():
        flag, kind = "--" + name.replace("_", "-"), str(f.type)
        shown = f.default is not None and f.metadata.get("show_default", True)
        help_text = f.metadata["help"] + (f" (default: {f.default})" if shown else "")
        if kind == "bool":
            p.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        if f.metadata.get("negatable"):  # --flag / --no-flag, None when neither is given
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        value_type = int if "int" in kind else float if "float" in kind else str
        nargs = f.metadata.get("nargs")
        p.add_argument(flag, type=value_type, nargs=nargs, default=None, metavar=name.upper(), help=help_text)
    p.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of the options above (flags override it)"
    )


def _add_quantize(p: argparse.ArgumentParser) -> None:
    """``--quantize 4bit|8bit``: the base's linear layers quantized with bitsandbytes at load (QLoRA)."""
    p.add_argument(
        "--quantize",
        choices=("4bit", "8bit"),
        default=None,
        help="load the base model's linear layers quantized with bitsandbytes: 4bit (NF4) or 8bit",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_adapter(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--adapter DIR`` as in every command; the bare ``DIR`` (the older form) is accepted too."""
    p.add_argument("--adapter", metavar="DIR", help=help_text + " (required)")
    p.add_argument("adapter_dir", nargs="?", metavar="DIR", help="same as --adapter DIR")


def _one_adapter(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fold the positional DIR of merge/info into ``args.adapter``; exactly one of the two forms is required."""
    if not hasattr(args, "adapter_dir"):
        return
    given = [a for a in (args.adapter, args.adapter_dir) if a is not None]
    sub = parser._subparsers._group_actions[0].choices[args.command]
    if not given:
        sub.error("the adapter folder is required: --adapter DIR")
    if len(given) == 2 and Path(given[0]) != Path(given[1]):
        sub.error(f"two different adapter folders given: --adapter {given[0]} and {given[1]}")
    args.adapter = given[0]


def _version() -> str:
    """The installed distribution's version (package metadata); the source tree's when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftkit")
    except PackageNotFoundError:
        from peftkit import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning from the command line.", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"peftkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="fine-tune a causal LM with an adapter (LoRA, DoRA)", epilog=EPILOG)
    _add_train_flags(p)
    _add_common(p)

    model_help = (
        "base model: a local HF folder or Hub id (default: the base the adapter was trained on, its "
        "base_model_name_or_path; without an adapter, the embedded SmolLM2-135M-Instruct); an architecture "
        "or size different from the adapter's base is an error"
    )
    p = sub.add_parser("generate", help="generate from the base model plus adapters, once or as a chat")
    p.add_argument("prompt", nargs="?", help="the user message; omit it for an interactive chat")
    p.add_argument("--model", help=model_help)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="adapter folder; repeat to compare several (one answer each)",
    )
    p.add_argument("--base", action="store_true", help="also answer with the base model (adapters disabled)")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate per answer (default: 128)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)"
    )
    _add_quantize(p)
    _add_common(p)

    p = sub.add_parser(
        "eval", help="loss, perplexity and exact match on a dataset, with or without an adapter"
    )
    p.add_argument(
        "--data", nargs="+", help="dataset files or a datasets Hub name (default: the bundled held-out set)"
    )
    p.add_argument("--model", help=model_help)
    p.add_argument(
        "--adapter", metavar="DIR", help="adapter folder to evaluate (default: the base model alone)"
    )
    p.add_argument(
        "--max-length", type=int, default=256, help="truncate rows to this many tokens (default: 256)"
    )
    p.add_argument("--limit", type=int, default=0, help="evaluate at most this many rows (default: 0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default: 16)")
    p.add_argument(
        "--no-exact-match", action="store_true", help="skip generation; report loss and perplexity only"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate for exact match (default: longest reference answer + 4)",
    )
    _add_quantize(p)
    _add_common(p)

    p = sub.add_parser(
        "merge", help="fold an adapter into the base weights; write a plain transformers model folder"
    )
    _add_adapter(p, "adapter folder to merge")
    p.add_argument("--model", help=model_help)
    p.add_argument(
        "--output", required=True, help="folder for the merged model (config, safetensors, tokenizer)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    _add_common(p)

    p = sub.add_parser(
        "export", help="write an adapter for other runtimes: a llama.cpp/Ollama LoRA GGUF, or a merged model"
    )
    _add_adapter(p, "adapter folder to export")
    p.add_argument("--model", help=model_help)
    p.add_argument(
        "--format",
        choices=("gguf", "safetensors-merged"),
        default="gguf",
        help="gguf: a llama.cpp LoRA adapter file (plus an Ollama Modelfile); safetensors-merged: as `merge`",
    )
    p.add_argument("--output", required=True, help="the .gguf file, or the merged model's folder")
    p.add_argument(
        "--merged",
        action="store_true",
        help="with --format gguf: the whole merged model (weights, tokenizer, chat template) as one GGUF",
    )
    p.add_argument(
        "--dtype",
        choices=("f32", "f16", "q8_0"),
        help="tensor type in the GGUF (adapter: f32 or f16, default f32; --merged: f32, f16 or q8_0, default f16)",
    )
    p.add_argument(
        "--base-gguf",
        metavar="FILE",
        help="the base model's GGUF, named in the Ollama Modelfile (default: the embedded model's, when it is the base)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_common(p)

    p = sub.add_parser("serve", help="serve the model and adapters over an OpenAI-compatible HTTP API")
    from peftkit.serve.server import add_arguments

    add_arguments(p)
    _add_quantize(p)
    _add_common(p)

    p = sub.add_parser(
        "info", help="describe an adapter folder: method, targets, rank, parameters, size, base model"
    )
    _add_adapter(p, "adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument(
        "--analyze",
        action="store_true",
        help="load the base and report, per layer and module, |dW|_F, |dW|/|W|, effective and stable rank",
    )
    p.add_argument(
        "--compare", metavar="DIR", help="with --analyze: a second adapter; adds the cosine of the two dW"
    )
    p.add_argument(
        "--png", metavar="FILE", help="with --analyze: a layers x modules heatmap of |dW|/|W| (or the cosine)"
    )
    p.add_argument("--model", help="with --analyze: the base model (default: the adapter's recorded base)")
    _add_common(p)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from peftkit.train.loop import train
    from peftkit.train.options import FIELDS, given_values, length_note, load_config_file, make_options

    file_values = load_config_file(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in FIELDS}
    options = make_options(file_values, flags)
    note = length_note(given_values(file_values, flags))
    if note:
        _say(note)
    report = train(options, progress=not args.no_progress, say=_say)
    if report["markdown"]:  # empty on the processes other than rank 0 of a torchrun launch
        print(report["markdown"])
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    from peftkit.serve.server import run

    return run(args)


def dispatch(args: argparse.Namespace) -> int:
    from peftkit.train import commands

    handlers = {
        "train": run_train,
        "generate": commands.generate,
        "eval": commands.evaluate,
        "merge": commands.merge,
        "info": commands.info,
        "serve": _serve,
        "export": commands.export,
    }
    return handlers[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console script; returns the exit status.

    Every error ends as one line on stderr and a non-zero exit (``--debug`` re-raises it with its traceback):
    a user mistake (:class:`PeftkitError`, the library's ``ValueError``/``OSError``) as its message; anything
    else as its type, message and the file:line that raised it, so a genuine bug still tells where it is.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_adapter(parser, args)
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"peftkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"peftkit {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 1) if isinstance(e, PeftkitError) else 1


def describe_error(e: BaseException) -> str:
    """One line for ``e``: the message of a user error, else ``Type: message (at file:line in function)``.

    User errors are :class:`PeftkitError` and the ``ValueError``/``OSError`` that peftkit's own code raises
    about its input; the same types raised inside torch or transformers get the full form, like any other.
    """
    frames = traceback.extract_tb(e.__traceback__)
    raised_by_peftkit = bool(frames) and "peftkit" in Path(frames[-1].filename).parts
    if isinstance(e, PeftkitError) or (isinstance(e, (ValueError, OSError)) and raised_by_peftkit):
        return _one_line(e)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {_short_path(last.filename)}:{last.lineno} in {last.name}; rerun with --debug for the traceback)"
    return f"{type(e).__name__}: {_one_line(e)}{where}"


def _short_path(filename: str) -> str:
    """``.../site-packages/torch/optim/adamw.py`` -> ``torch/optim/adamw.py``: the package-relative path."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages", "src"):
        if marker in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(marker) :])
    return filename


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def run() -> None:
    """Console-script entry point (``peftkit``, ``python -m peftkit.cli``): `main`, then a quick exit.

    When `main` returns, every file is written and closed. CPython's own teardown afterwards (freeing torch's
    and transformers' modules and the model's tensors one object at a time) took 1.2-1.4 s after a
    `peftkit train` on this 2-core machine, all of it after the exit handlers (14 ms). So the exit handlers run,
    non-daemon threads are joined and stdout/stderr flushed, as at a normal exit, and the process then ends
    with `os._exit`, leaving the memory to the kernel. The process is the command's own, so the commands may
    also tune its allocator (`heap.command_process`)."""
    from peftkit import heap

    heap.command_process = True
    code = main()
    atexit._run_exitfuncs()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to write to
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
