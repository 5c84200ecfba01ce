"""Building and running the server from command-line arguments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="base model: a local HF folder or Hub id (default: the base the adapters were trained on, else the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve the adapter folder PATH as model NAME (repeatable; PATH alone names it after its run folder)",
    )
    p.add_argument(
        "--adapter-dir",
        metavar="DIR",
        help="serve every adapter folder in DIR (DIR/NAME or DIR/NAME/adapter); default: ./runs if no --adapter",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together per step (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle cores)")


def build(args: argparse.Namespace, say=print):
    """(engine, app, base_id) for the parsed `peftkit serve` arguments."""
    from peftkit.train.modeling import choose_base, load_model_and_tokenizer, set_threads

    from .adapters import discover, load, scan
    from .app import create_app
    from .engine import Engine

    set_threads(args.threads)
    specs = discover(args.adapter)
    directory = args.adapter_dir or ("runs" if not args.adapter and Path("runs").is_dir() else None)
    for name, path in (scan(directory) if directory else {}).items():
        specs.setdefault(name, path)
    base = choose_base(args.model, [Path(p) for p in specs.values()])  # the adapters' base, checked to agree
    model, tokenizer, name = load_model_and_tokenizer(
        base, progress=False, quantize=getattr(args, "quantize", None)
    )
    base_id = Path(name).name if Path(name).exists() else name
    engine = Engine(model, tokenizer, max_batch=args.max_batch)
    for adapter, path in specs.items():
        load(engine, adapter, path, base_id)
        say(f"peftkit serve: adapter {adapter!r} from {path}")
    return engine, create_app(engine, base_id), base_id


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .adapters import AdapterError

    try:
        engine, app, base_id = build(args, say=lambda m: print(m, file=sys.stderr, flush=True))
    except AdapterError as e:
        raise ValueError(str(e)) from None
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    print(
        f"peftkit serve: model {base_id!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True
    )
    try:
        server.run()
    finally:
        engine.close()
    return 0
