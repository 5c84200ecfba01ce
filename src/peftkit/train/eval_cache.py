"""The base model's held-out metrics, remembered between runs (`--no-eval-cache` recomputes them).

The evaluation before training measures the base model alone. For the same model files, held-out rows and
evaluation settings, run by the same peftkit, torch and transformers, it computes the same loss and the same
answers every time (up to fp32 rounding between thread counts): ~15 s of the default `peftkit train` on 2
cores, the same work on every run. A run stores the result under `<cache dir>/eval/<key>.json` and a later run
with the same key reads it back instead, so a second run of the default demo (or a sweep of training settings
on one base and one held-out set) measures the base once.

The key is a SHA-256 of
- the model folder's files (name, size, modification time; a re-converted or edited model is a new key), and
  `--quantize`; a Hub id is never cached (its files could change upstream unseen);
- the held-out rows (every message and response), `--max-length`, the tokens generated for exact match, the
  number of samples shown;
- the source of every peftkit module (any change to how peftkit loads, tokenizes or evaluates is a new key)
  and the torch and transformers versions.
A file that cannot be read or parsed is treated as missing (and replaced); writes are atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import peftkit
from peftkit.atomic_files import atomic_write_bytes
from peftkit.train.data import Example

FOLDER = "eval"


def _package_source_digest() -> str:
    """SHA-256 over every .py file of the installed peftkit package (path and bytes), sorted."""
    root = Path(peftkit.__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _model_identity(model: str) -> list | None:
    """(name, size, mtime_ns) of every file in the local model folder `model`; None if it is not one."""
    folder = Path(model)
    if not (folder / "config.json").is_file():
        return None
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]


def key(
    model: str,
    rows: list[Example],
    max_length: int,
    max_new_tokens: int,
    quantize: str | None,
    n_samples: int = 5,
) -> str | None:
    """The cache key of the base model's held-out metrics, or None when they cannot be cached (a Hub id)."""
    import torch
    import transformers

    identity = _model_identity(model)
    if identity is None or not rows:
        return None
    record = {
        "model": [str(Path(model).resolve()), identity, quantize],
        "rows": [dataclasses.asdict(r) for r in rows],
        "settings": [max_length, max_new_tokens, n_samples],
        "code": [_package_source_digest(), torch.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode()).hexdigest()


def cache_file(cache_key: str) -> Path:
    from peftkit.train.default_model import cache_dir

    return cache_dir() / FOLDER / f"{cache_key}.json"


def read(cache_key: str | None) -> dict | None:
    """The stored metrics (``{"loss", "exact_match", "measured_at"}``) for `cache_key`, or None."""
    if cache_key is None:
        return None
    try:
        stored = json.loads(cache_file(cache_key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not {"loss", "exact_match", "measured_at"} <= set(stored):
        return None
    return stored


def write(cache_key: str | None, metrics: dict | None) -> None:
    """Store `metrics` (held_out_metrics' dict) under `cache_key`; a cache that cannot be written is skipped."""
    if cache_key is None or metrics is None:
        return
    stored = {**metrics, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        path = cache_file(cache_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(stored, indent=1) + "\n").encode())
    except OSError:
        pass  # a read-only or full cache dir costs the next run 15 s, never this run's result
