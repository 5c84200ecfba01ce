"""Which modules an adapter targets: name matching, per-architecture defaults, `"all-linear"`, and errors
that list what the model does contain when a target matches nothing."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from .errors import NoMatchingPeftModuleError

try:  # GPT-2 style layers store their weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]

# Default target modules per `config.model_type` for LoRA-like methods (the attention projections the
# LoRA paper adapts). The values match HF peft's defaults, so `LoraConfig()` means the same in both.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "gptj",
            "opt",
            "bart",
            "mbart",
            "stablelm",
            "starcoder2",
            "olmo",
            "olmo2",
            "cohere",
            "granite",
            "smollm3",
            "blenderbot",
            "pegasus",
            "marian",
            "m2m_100",
            "whisper",
            "persimmon",
        ],
        ["q_proj", "v_proj"],
    ),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon", "chatglm", "glm"], ["query_key_value"]),
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm", "megatron-bert"],
        ["query", "value"],
    ),
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    **dict.fromkeys(["t5", "mt5", "umt5", "longt5"], ["q", "v"]),
    "mpt": ["Wqkv"],
    "gpt_neo": ["q_proj", "v_proj"],
    "codegen": ["qkv_proj"],
}

# AdaLoRA's defaults (HF peft's): LoRA's for the architectures listed, with every attention projection and
# the MLP for six of them; an architecture not listed needs explicit target_modules, as in HF peft.
_ADALORA_WIDER: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
_ADALORA_AS_LORA = (
    "bert", "bloom", "deberta", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neo",
    "gpt_neox", "gptj", "llama", "qwen2", "qwen3",
)  # fmt: skip
ADALORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    **{name: DEFAULT_TARGETS[name] for name in _ADALORA_AS_LORA},
    **_ADALORA_WIDER,
}

# (IA)^3 defaults (HF peft's): the attention keys/values and the MLP output, whose *input* is scaled
# (`feedforward_modules`, a subset of the targets).
IA3_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn", "mlp.c_proj"]),
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    **dict.fromkeys(["roberta", "bert"], ["key", "value", "output.dense"]),
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    **dict.fromkeys(
        ["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"], ["query_key_value", "dense_4h_to_h"]
    ),
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    **dict.fromkeys(["llama", "mistral"], ["k_proj", "v_proj", "down_proj"]),
    "mixtral": ["k_proj", "v_proj", "w2"],
    "phi": ["q_proj", "v_proj", "fc2"],
    **dict.fromkeys(
        ["llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], ["q_proj", "v_proj", "down_proj"]
    ),
}
IA3_DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["mlp.c_proj"]),
    "bloom": ["mlp.dense_4h_to_h"],
    **dict.fromkeys(["roberta", "bert", "deberta-v2", "deberta"], ["output.dense"]),
    **dict.fromkeys(["opt", "bart", "phi"], ["fc2"]),
    "gptj": ["fc_out"],
    **dict.fromkeys(["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"], ["dense_4h_to_h"]),
    "gpt_neo": ["c_proj"],
    "mixtral": ["w2"],
    **dict.fromkeys(
        ["llama", "llama4", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], ["down_proj"]
    ),
}
# LayerNorm tuning defaults (HF peft's): the norms of each block and the final norm.
_DECODER_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA_NORMS = [
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
]
LN_TUNING_DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "gemma"], _DECODER_NORMS),
    **dict.fromkeys(["gemma2", "gemma3_text"], _GEMMA_NORMS),
    **dict.fromkeys(["bloom", "falcon"], ["input_layernorm", "post_attention_layernorm", "ln_f"]),
    **dict.fromkeys(["t5", "mt5"], ["layer_norm", "final_layer_norm"]),
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    **dict.fromkeys(["qwen2", "qwen3"], ["post_attention_layernorm"]),
    "llava": ["multi_modal_projector", *_DECODER_NORMS, "embed_tokens", "lm_head"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
}

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
SUPPORTED_LEAF_TYPES: tuple[type, ...] = LINEAR_TYPES + (nn.Embedding, nn.Conv2d)


def get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent module, the module at `key`, its attribute name in the parent)."""
    parent_key, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    return parent, getattr(parent, child), child


def _matches_names(key: str, spec: str | Iterable[str]) -> bool:
    """A str spec is a regex that must match the whole key; a list matches a name or a `.`-suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == name or key.endswith("." + name) for name in spec)


def _layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index a module sits in (`model.layers.3.mlp` -> 3), or None when it is in no block."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [None])
    for pattern in patterns:
        regex = r".*\.[^.]*\.(\d+)\." if pattern is None else rf".*\.{re.escape(pattern)}\.(\d+)\."
        m = re.match(regex, key)
        if m:
            return int(m.group(1))
    return None


def _output_head_name(model: nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name.rsplit(".", 1)[-1]
    return None


def all_linear_names(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Suffix names of every Linear/Conv1D in the model except the output head and `skip` (classifier heads)."""
    head = _output_head_name(model)
    names, inside = set(), ()  # an adapter layer counts as its base layer; its own sub-layers do not count
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if hasattr(m, "base_layer") and hasattr(m, "adapter_attrs"):
            inside = name + "."
            m = m.base_layer
        if isinstance(m, LINEAR_TYPES):
            names.add(name.rsplit(".", 1)[-1])
    names -= {head, *skip}
    return sorted(n for n in names if n)


def default_targets(
    model: nn.Module, table: dict[str, list[str]] | None = None, field: str = "target_modules"
) -> list[str]:
    """The default targets for this architecture (from `table`, LoRA's by default); the error says how to
    choose when there are none."""
    table = DEFAULT_TARGETS if table is None else table
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in table:
        return list(table[model_type])
    hint = ", ".join(all_linear_names(model)[:12])
    raise ValueError(
        f"No default {field} for model_type {model_type!r}; set {field} explicitly "
        f'(a list of module names, a regex, or "all-linear"). Linear layers in this model: {hint}'
    )


def resolve_target_modules(model: nn.Module, config: Any, table: dict[str, list[str]] | None = None) -> Any:
    """`config` with `target_modules` made concrete: the architecture's default (from `table`) when None,
    every Linear/Conv1D but the output head and `modules_to_save` for `"all-linear"`; returns a new config."""
    if config.target_modules is None:
        return dataclasses.replace(config, target_modules=default_targets(model, table))
    if config.target_modules == "all-linear":
        skip = getattr(config, "modules_to_save", None) or []
        return dataclasses.replace(config, target_modules=all_linear_names(model, skip=skip))
    return config


def _candidate_names(model: nn.Module, limit: int = 20) -> str:
    names: list[str] = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, SUPPORTED_LEAF_TYPES) and short not in names:
            names.append(short)
    more = "" if len(names) <= limit else f" (+{len(names) - limit} more)"
    return ", ".join(names[:limit]) + more


def find_targets(model: nn.Module, config: Any, wrapper_types: tuple[type, ...] = ()) -> list[str]:
    """Full names of the modules `config` targets.

    Honours `target_modules` (list, regex, already resolved), `exclude_modules`, `layers_to_transform` and
    `layers_pattern`. Modules inside an existing adapter wrapper (its base layer and adapter tensors) are
    never targets themselves.

    Raises:
        NoMatchingPeftModuleError: nothing matched (a `ValueError`); the message lists the module names the
            model does have.
    """
    spec = config.target_modules
    layers = getattr(config, "layers_to_transform", None)  # not every method has these fields
    layers = [layers] if isinstance(layers, int) else layers
    exclude = getattr(config, "exclude_modules", None)
    wrapped: list[str] = []
    keys: list[str] = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(w + ".") for w in wrapped):
            continue
        if wrapper_types and isinstance(module, wrapper_types):
            wrapped.append(key)
        if not _matches_names(key, spec):
            continue
        if exclude and _matches_names(key, exclude):
            continue
        if layers is not None and _layer_index(key, getattr(config, "layers_pattern", None)) not in layers:
            continue
        keys.append(key)
    if not keys:
        where = f" in layers {layers}" if layers is not None else ""
        raise NoMatchingPeftModuleError(
            f"Target modules {spec!r} not found{where} in the base model ({type(model).__name__}). "
            f"Module names it does contain: {_candidate_names(model)}"
        )
    return keys


def replicate_layers(model: nn.Module, layer_map: list[tuple[int, int]] | list[list[int]]) -> None:
    """Rebuild the model's block list from `[start, end)` ranges of its blocks (LoRA's `layer_replication`):
    `[[0, 4], [2, 5]]` on blocks 0..4 gives 0 1 2 3 2 3 4. Repeated blocks share the original parameters (no
    copy of the base weights); each position gets its own `layer_idx` (KV cache slot) and, later, its own adapter.

    Raises:
        ValueError: the model has no block list this knows (`model.layers`, `encoder.layer`, `h`), or a range is
            outside it.
    """
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    inner = getattr(inner, "bert", inner)
    for owner, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        blocks = getattr(owner, attr, None)
        if isinstance(blocks, nn.ModuleList):
            break
    else:
        raise ValueError(
            f"layer_replication: no block list found in {type(model).__name__} (looked for .layers, "
            ".encoder.layer and .h, as for Llama-, BERT- and Falcon-like models)"
        )
    new: list[nn.Module] = []
    for start, end in layer_map:
        if not 0 <= start < end <= len(blocks):
            raise ValueError(
                f"layer_replication: range [{start}, {end}) is outside the model's {len(blocks)} blocks"
            )
        for i in range(start, end):
            memo = {id(p): p for p in blocks[i].parameters()}  # share parameters, copy the rest
            block = copy.deepcopy(blocks[i], memo)
            for sub in block.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(block)
    setattr(owner, attr, nn.ModuleList(new))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new)
        types = getattr(
            config, "layer_types", None
        )  # per-layer attention kinds (sliding/full) follow the map
        if isinstance(types, list) and len(types) == len(blocks):
            config.layer_types = [types[i] for start, end in layer_map for i in range(start, end)]
