"""The CLI's other commands: ``generate``, ``eval``, ``merge`` and ``info``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from peftkit import heap
from peftkit.train.data import Example, encode_prompt, load_examples, tokenize_all
from peftkit.train.errors import PeftkitError
from peftkit.train.evaluate import default_max_new_tokens, eval_loss
from peftkit.train.held_out import held_out
from peftkit.train.modeling import choose_base, load_model_and_tokenizer, set_threads


def _check_adapter_dir(path: str) -> Path:
    """The adapter folder, once its adapter_config.json is known to be valid (errors name the file and key)."""
    import warnings

    from peftkit.config import PeftConfig

    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise PeftkitError(f"not an adapter folder: {path} (adapter_config.json not found)")
    try:
        with warnings.catch_warnings():  # unknown keys (a newer HF peft) are not this command's concern
            warnings.simplefilter("ignore")
            PeftConfig.from_json_file(folder / "adapter_config.json")
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():  # a corrupt file is named as such, not as an adapter that "does not fit"
            from peftkit.io import check_safetensors_header

            check_safetensors_header(str(weights))
    except ValueError as e:
        raise PeftkitError(str(e)) from None
    return folder


def load_with_adapters(model: str | None, adapters: list[str], progress: bool, quantize: str | None = None):
    """Base model plus each adapter under its folder name.

    The base is ``model`` (``--model``) when given, else the one the adapters were trained on
    (``base_model_name_or_path``), else the embedded default. Returns ``(model, tokenizer, adapter_names,
    base_name)``.
    """
    import peftkit

    folders = [_check_adapter_dir(a) for a in adapters]
    chosen = choose_base(model, folders)
    try:
        base, tokenizer, base_name = load_model_and_tokenizer(chosen, progress, quantize)
    except PeftkitError as e:
        if model or not folders or chosen is None:
            raise
        raise PeftkitError(
            f"{e} (the base_model_name_or_path of {folders[0] / 'adapter_config.json'}; pass --model to use "
            "another copy of that base)"
        ) from e
    if not folders:
        return base.eval(), tokenizer, [], base_name
    names = [f"{i}-{f.resolve().name}" for i, f in enumerate(folders)]
    wrapped = None
    for name, folder in zip(names, folders):
        try:
            if wrapped is None:
                wrapped = peftkit.PeftModel.from_pretrained(base, str(folder), adapter_name=name)
            else:
                wrapped.load_adapter(str(folder), adapter_name=name)
        except ValueError as e:  # shapes or target modules that this base does not have
            raise PeftkitError(f"adapter {folder} does not fit base model {base_name}: {e}") from e
    return wrapped.eval(), tokenizer, names, base_name


@torch.no_grad()
def _answer(model, tokenizer, messages: list[dict], args) -> str:
    ids = torch.tensor([encode_prompt(tokenizer, Example(tuple(messages), ""))])  # [1, prompt_len]
    sample = args.temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _answers(model, tokenizer, names: list[str], messages: list[dict], args) -> list[tuple[str, str]]:
    """One (label, answer) per adapter, plus the base model when asked (or when there is no adapter)."""
    results = []
    if args.base or not names:
        with model.disable_adapter() if names else contextlib.nullcontext():
            results.append(("base", _answer(model, tokenizer, messages, args)))
    for name in names:
        model.set_adapter(name)
        results.append((name, _answer(model, tokenizer, messages, args)))
    return results


def generate(args) -> int:
    """Answer one prompt, or chat interactively (history kept per session, `/quit` to stop)."""
    set_threads(None)
    model, tokenizer, names, _ = load_with_adapters(
        args.model, args.adapter, not args.no_progress, getattr(args, "quantize", None)
    )
    if args.prompt is not None:
        for label, text in _answers(
            model, tokenizer, names, [{"role": "user", "content": args.prompt}], args
        ):
            print(f"[{label}] {text}" if len(names) + args.base > 1 else text)
        return 0
    print("Interactive chat; /reset clears the history, /quit (or Ctrl-D) exits.", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if line in {"/quit", "/exit"}:
            return 0
        if line == "/reset" or not line:
            history = [] if line == "/reset" else history
            continue
        history.append({"role": "user", "content": line})
        answers = _answers(model, tokenizer, names, history, args)
        for label, text in answers:
            print(f"[{label}] {text}" if len(answers) > 1 else text)
        history.append({"role": "assistant", "content": answers[-1][1]})


def evaluate(args) -> int:
    """Print loss, perplexity and (unless --no-exact-match) exact match on a dataset."""
    from peftkit.train.loop import BUNDLED_EVAL, bundled

    set_threads(None)
    rows = load_examples(args.data or [bundled(BUNDLED_EVAL)])
    rows = rows[: args.limit] if args.limit else rows
    model, tokenizer, _, base_name = load_with_adapters(
        args.model,
        [args.adapter] if args.adapter else [],
        not args.no_progress,
        getattr(args, "quantize", None),
    )
    if not getattr(args, "quantize", None):  # quantized: the opposite (heap.py)
        heap.keep_freed_memory()  # each batch reuses the pages the last one freed, without page faults
    items = tokenize_all(tokenizer, rows, args.max_length, "evaluation")  # an error if no row fits
    result = {"base_model": base_name, "adapter": args.adapter, "rows": len(rows)}
    if args.no_exact_match:
        result.update(eval_loss(model, items, tokenizer.pad_token_id, args.batch_size))
    else:  # loss and exact match from one pass over each prompt (held_out), as `peftkit train` reports them
        max_new = args.max_new_tokens or default_max_new_tokens(tokenizer, rows)
        loss, em = held_out(model, tokenizer, rows, args.max_length, max_new, args.batch_size, n_samples=0)
        result.update(loss, exact_match=em["exact_match"], correct=em["correct"])
    print(json.dumps(result, indent=2))
    return 0


def merge(args) -> int:
    """Merge the adapter into the base weights and save a plain transformers folder (atomically)."""
    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise PeftkitError(f"merge output {out} is not empty; pass --overwrite to replace it")
    set_threads(None)
    model, tokenizer, _, _ = load_with_adapters(args.model, [args.adapter], not args.no_progress)
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def export(args) -> int:
    """`peftkit export`: a llama.cpp LoRA GGUF (+ Ollama Modelfile), the merged model as one GGUF (`--merged`,
    + Modelfile), or the merged model folder (`--format safetensors-merged`, exactly `peftkit merge`)."""
    if args.format == "safetensors-merged":
        return merge(args)
    from peftkit.export.gguf_adapter import ExportError

    folder = _check_adapter_dir(args.adapter)
    out = Path(args.output).expanduser()
    if out.exists() and not args.overwrite:
        raise PeftkitError(f"export output {out} exists; pass --overwrite to replace it")
    try:
        return _export_merged_gguf(args, out) if args.merged else _export_adapter_gguf(args, folder, out)
    except ExportError as e:
        raise PeftkitError(str(e)) from e


def _export_adapter_gguf(args, folder: Path, out: Path) -> int:
    from transformers import AutoConfig

    from peftkit.export.gguf_adapter import write_gguf_adapter
    from peftkit.train.modeling import resolve_model

    dtype = args.dtype or "f32"
    if dtype not in ("f32", "f16"):
        raise PeftkitError(f"--dtype {dtype}: a llama.cpp LoRA adapter is written as f32 or f16")
    base = resolve_model(choose_base(args.model, [folder]), progress=not args.no_progress)
    summary = write_gguf_adapter(folder, out, AutoConfig.from_pretrained(base), dtype=dtype)
    base_gguf = args.base_gguf or _default_gguf_if_base(base)
    lines = [f"FROM {base_gguf or '<path to the base model GGUF>'}", f"ADAPTER {out.resolve()}"]
    modelfile = out.with_name(out.stem + ".Modelfile")
    modelfile.write_text("\n".join(lines) + "\n")
    print(
        f"llama.cpp LoRA adapter written to {out} ({summary['tensors']} tensors, {summary['bytes']:,} bytes, "
        f"architecture {summary['architecture']}); Ollama Modelfile: {modelfile}"
    )
    return 0


def _export_merged_gguf(args, out: Path) -> int:
    """The adapter merged into its base, written with the base's tokenizer and chat template as one GGUF."""
    from peftkit.export.gguf_model import modelfile_for_merged, write_gguf_model
    from peftkit.train.modeling import resolve_model

    set_threads(None)
    model, tokenizer, _, _ = load_with_adapters(args.model, [args.adapter], not args.no_progress)
    base = resolve_model(choose_base(args.model, [_check_adapter_dir(args.adapter)]), progress=False)
    merged = model.merge_and_unload()
    base_gguf = args.base_gguf or _default_gguf_if_base(str(base))
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)  # tokenizer.json + chat template, as the base has them
        summary = write_gguf_model(
            merged.state_dict(),
            merged.config,
            tok_dir,
            out,
            dtype=args.dtype or "f16",
            tokenizer_pre=_gguf_tokenizer_pre(base_gguf),
            name=Path(args.adapter).resolve().name,
        )
    modelfile = out.with_name(out.stem + ".Modelfile")
    modelfile.write_text(modelfile_for_merged(out, getattr(tokenizer, "chat_template", None)))
    print(
        f"merged model written to {out} as GGUF ({summary['tensors']} tensors, {summary['bytes']:,} bytes, "
        f"{args.dtype or 'f16'}, architecture {summary['architecture']}); Ollama Modelfile: {modelfile}"
    )
    return 0


def _gguf_tokenizer_pre(base_gguf: str | None) -> str | None:
    """llama.cpp's pre-tokenizer label (`tokenizer.ggml.pre`) from the base model's GGUF, when there is one."""
    if not base_gguf or not Path(base_gguf).is_file():
        return None
    import gguf

    field = gguf.GGUFReader(base_gguf).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _default_gguf_if_base(base: str) -> str | None:
    """The embedded model's GGUF file when `base` is the embedded model's converted folder (never converts)."""
    from peftkit.train.default_model import MODEL_DIRNAME, cache_dir, find_gguf

    if Path(base).resolve() != (cache_dir() / MODEL_DIRNAME).resolve():
        return None
    try:
        return str(find_gguf())
    except PeftkitError:  # the wheel is gone: the Modelfile gets a placeholder
        return None


def info(args) -> int:
    """Describe an adapter folder without loading its base model (`--analyze`: with it, see `analyze`)."""
    from safetensors import SafetensorError, safe_open

    from peftkit.config import read_json_file
    from peftkit.io import check_safetensors_header

    if getattr(args, "analyze", False):
        return analyze(args)
    if getattr(args, "compare", None) or getattr(args, "png", None):
        raise PeftkitError("--compare and --png go with --analyze")
    folder = _check_adapter_dir(args.adapter)
    config = read_json_file(str(folder / "adapter_config.json"))
    weights = folder / "adapter_model.safetensors"
    params = 0
    if weights.is_file():
        try:
            check_safetensors_header(str(weights))
            with safe_open(str(weights), framework="pt") as f:
                params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except (ValueError, SafetensorError) as e:
            raise PeftkitError(str(e) if str(weights) in str(e) else f"{weights}: {e}") from None
    targets = config.get("target_modules")
    summary = {
        "method": config.get("peft_type") + (" (DoRA)" if config.get("use_dora") else ""),
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "parameters": params,
        "size_bytes": sum(p.stat().st_size for p in folder.glob("adapter_model.*")),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>15}: {value if value is not None else '-'}")
    return 0


def analyze(args) -> int:
    """`peftkit info --analyze`: per layer and module, what the adapter's update ΔW looks like (peftkit.analyze);
    with --compare, the cosine of the two adapters' ΔW; with --png, a heatmap."""
    from peftkit import analyze as A

    adapters = [args.adapter] + ([args.compare] if args.compare else [])
    set_threads(None)
    model, _, names, _ = load_with_adapters(args.model, adapters, not args.no_progress)
    try:
        rows = A.analyze(model, names[0], names[1] if args.compare else None)
    except ValueError as e:
        raise PeftkitError(f"{args.adapter}: {e}") from e
    if args.compare and all(r.get("cosine") is None for r in rows):
        raise PeftkitError(
            f"{args.compare} adapts none of the modules {args.adapter} adapts; nothing to compare"
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(A.format_table(rows))
        top = max(rows, key=lambda r: r["relative"])
        print(f"largest change: {top['name']} (|dW|/|W| = {top['relative']:.4g})")
    if args.png:
        value = "cosine" if args.compare else "relative"
        try:
            A.heatmap(rows, args.png, value=value, title=f"{value}: {Path(args.adapter).name}")
        except ValueError as e:
            raise PeftkitError(f"--png {args.png}: {e}") from e
        print(f"heatmap written to {args.png}", file=sys.stderr)
    return 0
