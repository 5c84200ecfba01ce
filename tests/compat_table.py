"""The README's compatibility table: every name in HF peft's `peft.__all__` and what peftkit does with it.

Generated from the code (`peft.__all__`, `peftkit.__all__`, the registry, the `__peftkit_refused__` marks and
the import-path modules), so it cannot drift: `tests/test_compat_table.py` fails when the README section
differs from `render()`. Rewrite it with

    PYTHONPATH=src python -m tests.compat_table --write

Lives in `tests/` because it imports HF peft, a test-only reference the library never imports.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import peft

import peftkit
from peftkit.registry import all_methods

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Compatibility with HF peft's public names"

# Names peftkit does not have, and why. A name of HF peft's `__all__` that is neither in `peftkit.__all__`
# nor here (nor an other method's Config/Model class) makes the test fail: someone has to decide.
IN_PROGRESS = "in progress"
NOT_PLANNED = "not planned"
ABSENT: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        [
            "LoftQConfig",
            "replace_lora_weights_loftq",
            "TrainableTokensConfig",
            "TrainableTokensModel",
            "cast_mixed_precision_params",
        ],
        (
            IN_PROGRESS,
            "issue 16, LoRA options (today a config asking for it is refused on load, naming the key)",
        ),
    ),
    **dict.fromkeys(
        [
            "ArrowConfig",
            "BdLoraConfig",
            "EvaConfig",
            "KasaConfig",
            "LoraGAConfig",
            "LoraRuntimeConfig",
            "MontecloraConfig",
            "VeloraConfig",
        ],
        (NOT_PLANNED, "sub-config of a LoRA variant or initialisation peftkit does not implement"),
    ),
    **dict.fromkeys(
        [
            "get_eva_state_dict",
            "initialize_lora_eva_weights",
            "preprocess_loraga",
            "find_kappa_target_modules",
            "create_arrow_model",
            "convert_to_lora",
            "save_as_lora",
        ],
        (
            NOT_PLANNED,
            "tool of a LoRA initialisation/variant peftkit does not implement (EVA, LoRA-GA, KappaTune, "
            "Arrow, conversion of other methods to LoRA)",
        ),
    ),
    **dict.fromkeys(
        [
            "CPTEmbedding",
            "CartridgeEncoder",
            "compose_cartridge_adapters",
            "MultitaskPromptTuningInit",
            "initialize_kv_prefix_from_past_key_values",
            "initialize_kv_prefix_from_text",
            "prompt_embeddings_from_past_key_values",
        ],
        (
            NOT_PLANNED,
            "part of a prompt-learning method peftkit does not implement (CPT, Cartridge, multitask)",
        ),
    ),
    **dict.fromkeys(
        ["PrefixEncoder", "PromptEncoder", "PromptEmbedding"],
        (
            NOT_PLANNED,
            "peftkit's prompt encoders (`peftkit.tuners.*`) compute every virtual token in one call "
            "(`forward()` takes no indices), so they are not exported under HF's names",
        ),
    ),
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING": (
        NOT_PLANNED,
        "`PeftMixedModel` takes LoRA, LoHa, LoKr, AdaLoRA and OFT adapters (`tuners/mixed.py`); this table of "
        "HF's tuner classes is not exported",
    ),
    **dict.fromkeys(
        [
            "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
            "bloom_model_postprocess_past_key_value",
        ],
        (
            NOT_PLANNED,
            "peftkit's prefix tuning builds transformers cache objects directly; no per-model hook",
        ),
    ),
}
# Module paths integrations import, documented with the names each provides.
IMPORT_PATHS: dict[str, tuple[str, ...] | None] = {  # None: the module's __all__
    "peftkit.utils": None,
    "peftkit.utils.constants": None,
    "peftkit.utils.other": None,
    "peftkit.utils.peft_types": None,
    "peftkit.utils.save_and_load": None,
    "peftkit.tuners.tuners_utils": None,
    "peftkit.tuners.lora": ("LoraConfig", "LoraLayer", "LoraModel"),
    "peftkit.tuners.lora.layer": None,
    "peftkit.tuners.lora.config": None,
    "peftkit.tuners.lora.model": None,
    "peftkit.optimizers": ("create_loraplus_optimizer",),
}
IMPORT_NOTES = {
    "peftkit.tuners.tuners_utils": "`BaseTunerLayer` is peftkit's `AdapterLayer`, `BaseTuner` its `BaseTuner`",
    "peftkit.tuners.lora": "one file; `LoraLayer` is the base of every LoRA layer class",
    "peftkit.tuners.lora.layer": "alias module (registered in `sys.modules`): `Linear` is `LoraLinear`, ...",
    "peftkit.tuners.lora.config": "alias module (registered in `sys.modules`)",
    "peftkit.tuners.lora.model": "alias module (registered in `sys.modules`)",
}
_METHOD_CLASS = re.compile(r"^(?P<stem>.+?)(Config|Model)$")


def status(name: str) -> tuple[str, str]:
    """(status, note) of one name of `peft.__all__`."""
    if name in peftkit.__all__:
        refused = getattr(getattr(peftkit, name), "__peftkit_refused__", None)
        return ("refused", refused.split(";")[0]) if refused else ("supported", "")
    if name in ABSENT:
        return ABSENT[name]
    if _METHOD_CLASS.match(name):
        return NOT_PLANNED, "another PEFT method (not implemented; add one with `register_peft_method`)"
    raise KeyError(f"{name} (in peft.__all__) has no status: export it from peftkit or add it to ABSENT")


def _module_names(path: str) -> str:
    module = importlib.import_module(path)
    names = IMPORT_PATHS[path] or module.__all__
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise AttributeError(f"{path} lacks {missing}")
    return ", ".join(f"`{n}`" for n in sorted(names))


def render() -> str:
    """The README section, heading included, ending with one newline."""
    rows = [(name, *status(name)) for name in sorted(peft.__all__, key=str.lower)]
    counts: dict[str, int] = {}
    for _, state, _ in rows:
        counts[state] = counts.get(state, 0) + 1
    summary = ", ".join(
        f"{counts[s]} {s}" for s in ("supported", "refused", IN_PROGRESS, NOT_PLANNED) if s in counts
    )
    methods = ", ".join(sorted(all_methods()))
    lines = [
        HEADING,
        "",
        f"Every name in HF peft {peft.__version__}'s `peft.__all__` ({len(rows)} names): {summary}. Methods "
        f"peftkit implements: {methods}. Generated from the code by `python -m tests.compat_table --write`; "
        "`tests/test_compat_table.py` fails when this section drifts.",
        "",
        "| name | status | note |",
        "| --- | --- | --- |",
        *(f"| `{name}` | {state} | {note} |" for name, state, note in rows),
        "",
        "Import paths that integrations (transformers, diffusers, TRL) use, as aliases of peftkit's own objects:",
        "",
        "| module | names | note |",
        "| --- | --- | --- |",
        *(f"| `{path}` | {_module_names(path)} | {IMPORT_NOTES.get(path, '')} |" for path in IMPORT_PATHS),
    ]
    return "\n".join(lines) + "\n"


def readme_section(text: str) -> str | None:
    """The section in `text` (from its heading to the end), or None."""
    start = text.find("\n" + HEADING + "\n")
    return None if start < 0 else text[start + 1 :]


def write() -> None:
    text = README.read_text(encoding="utf-8")
    current = readme_section(text)
    head = text[: len(text) - len(current)] if current is not None else text.rstrip("\n") + "\n\n"
    README.write_text(head + render(), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
        print(f"rewrote the section '{HEADING}' of {README}")
    else:
        sys.stdout.write(render())
