"""Loading base models and tokenizers for the CLI (fp32 on CPU), with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from peftkit.train.errors import PeftkitError


def resolve_model(model: str | None, progress: bool = True) -> str:
    """``model`` as given, or the embedded default model's folder (converted on first use)."""
    if model:
        return model
    from peftkit.train.default_model import default_model_path

    return str(default_model_path(progress=progress))


def load_model_and_tokenizer(model: str | None, progress: bool = True):
    """Return ``(model, tokenizer, name)`` for a local HF folder, a Hub id, or None (the default model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    name = resolve_model(model, progress)
    path = Path(name).expanduser()
    if (
        path.exists()
        and not (path / "config.json").is_file()
        or (not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1))
    ):
        raise PeftkitError(f"model not found: {name} (expected a folder with config.json, or a Hub id)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        base = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftkitError(f"cannot load model {name!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer, name


def set_threads(threads: int | None) -> int:
    """Use ``threads`` for torch CPU ops; by default every core, minus the cores other processes keep busy.

    On a busy machine oversubscribed OpenMP threads spin against each other: on 2 cores at load ~8, one
    thread trained 4x faster than two (12 s vs 50 s per step), so the default backs off.
    """
    if not threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        threads = max(1, cores - busy)
    torch.set_num_threads(threads)
    return torch.get_num_threads()
