"""Loading base models and tokenizers for the CLI (fp32 on CPU), with one-line errors.

Also: which base model an adapter folder belongs to (``base_model_name_or_path`` in its adapter_config.json),
and whether a ``--model`` given instead is the same architecture and size.
"""

from __future__ import annotations

import json
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


def load_model_and_tokenizer(
    model: str | None, progress: bool = True, quantize: str | None = None, empty: bool = False
):
    """Return ``(model, tokenizer, name)`` for a local HF folder, a Hub id, or None (the default model).

    ``quantize`` "4bit" (NF4, double quantization) or "8bit" loads the linear layers quantized with
    bitsandbytes, tensor by tensor from the folder's safetensors (``peftkit.stream_load.load_quantized``).
    ``empty``: the model's parameters on ``meta``, its weights not read (FSDP2's ranks > 0, ``sharded_load``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    name = resolve_model(model, progress)
    path = Path(name).expanduser()
    if path.is_dir():  # absolute, so the adapter's base_model_name_or_path works from any folder
        name = str(path.resolve())
    if (
        path.exists()
        and not (path / "config.json").is_file()
        or (not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1))
    ):
        raise PeftkitError(f"model not found: {name} (expected a folder with config.json, or a Hub id)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if empty:
            from peftkit.train.sharded_load import empty_model

            base = empty_model(name)
        elif quantize:
            base = _load_quantized(name, quantize)
        else:
            base = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftkitError(f"cannot load model {name!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer, name


QUANTIZE_CHOICES = ("4bit", "8bit")


def _load_quantized(name: str, quantize: str):
    """The base with bitsandbytes-quantized linear layers (fp32 elsewhere), never holding the fp32 model."""
    if quantize not in QUANTIZE_CHOICES:
        raise PeftkitError(f"--quantize must be 4bit or 8bit, got {quantize!r}")
    if not (Path(name) / "config.json").is_file():
        raise PeftkitError(
            f"--quantize {quantize} needs a local model folder with safetensors weights, not {name!r}"
        )
    from peftkit.stream_load import load_quantized

    try:
        return load_quantized(name, bits=int(quantize[0]), quant_type="nf4", double_quant=True)
    except (FileNotFoundError, ImportError) as e:
        raise PeftkitError(f"--quantize {quantize}: {e}") from None


def set_threads(threads: int | None) -> int:
    """Use ``threads`` for torch CPU ops; by default every core, minus the cores other processes keep busy
    (``busy_cores``: the load average, unless a sample of /proc/stat shows those cores free now).

    On a busy machine oversubscribed OpenMP threads spin against each other: on 2 cores at load ~8, one
    thread trained 4x faster than two (12 s vs 50 s per step), so the default backs off.
    """
    if not threads:
        from peftkit.train.busy_cores import busy_cores

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores - busy_cores(cores))
    torch.set_num_threads(threads)
    return torch.get_num_threads()


# config.json fields that must agree between the base an adapter was trained on and the one it is loaded on
SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "d_model",
)


def recorded_base(adapter: Path) -> str | None:
    """The base model an adapter folder names (``base_model_name_or_path``), resolved to a loadable name.

    An absolute or cwd-relative folder that exists is returned as an absolute path; a relative one is also
    looked up next to the adapter. The embedded default model's cache folder maps to this machine's copy
    (None when not converted yet: loading None converts it, offline). A Hub id is returned as is; a missing
    folder is an error naming the file and the key.
    """
    config_file = adapter / "adapter_config.json"
    value = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not value:
        return None
    from peftkit.train.default_model import MODEL_DIRNAME, cache_dir

    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [path, adapter / path]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return str(candidate.resolve())
    if path.name == MODEL_DIRNAME and path.parent.name in ("peftkit", cache_dir().name):  # the embedded model
        here = cache_dir() / MODEL_DIRNAME  # this machine's copy; None converts it when loaded
        return str(here) if (here / "config.json").is_file() else None
    if not value.startswith((".", "/", "~")) and value.count("/") <= 1 and not path.is_absolute():
        return value  # a Hub id
    raise PeftkitError(
        f"{config_file}: base_model_name_or_path {value!r} is not a model folder here "
        "(no config.json); pass --model with the base this adapter was trained on"
    )


def choose_base(model: str | None, adapters: list[Path]) -> str | None:
    """The base model to load for ``adapters``: ``--model`` when given, else the adapters' recorded base.

    Raises a one-line :class:`PeftkitError` naming both models when ``--model`` (or a second adapter's base)
    differs in architecture or size (``SHAPE_KEYS`` of config.json) from an adapter's recorded base.
    """
    recorded = [(folder, _recorded_or_unknown(folder, model)) for folder in adapters]
    chosen = model or next((base for _, base in recorded if base), None)
    chosen_source = "--model" if model else "the adapter's base"
    for folder, base in recorded:
        difference = _config_difference(chosen, base)
        if difference:
            raise PeftkitError(
                f"{chosen_source} {chosen} does not match the base model {base} that {folder} was trained on "
                f"(base_model_name_or_path in its adapter_config.json): {difference}"
            )
    return chosen


def _recorded_or_unknown(folder: Path, model: str | None) -> str | None:
    """``recorded_base(folder)``; with ``--model`` given, a recorded base missing here is just unknown."""
    try:
        return recorded_base(folder)
    except PeftkitError:
        if model:
            return None
        raise


def _config_difference(a: str | None, b: str | None) -> str | None:
    """``"hidden_size 32 vs 576"`` for the first SHAPE_KEYS field that differs; None if equal or unknown."""
    if a is None or b is None:
        return None
    first, second = _local_config(a), _local_config(b)
    if first is None or second is None:
        return None
    for key in SHAPE_KEYS:
        if key in first and key in second and first[key] != second[key]:
            return f"{key} {first[key]} vs {second[key]}"
    return None


def _local_config(name: str) -> dict | None:
    """config.json of a local model folder (None for a Hub id: comparing it would need the network)."""
    file = Path(name).expanduser() / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None
