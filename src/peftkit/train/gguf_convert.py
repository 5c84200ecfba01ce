"""Fast GGUF -> HF folder conversion for Llama-architecture GGUFs with a byte-level BPE ("gpt2") tokenizer.

Produces what transformers' GGUF loading + saving produces (``model.safetensors`` fp32 with the same names,
shapes and bit-identical values; ``config.json``; ``generation_config.json``; the tokenizer files), but reads
the file once with :mod:`peftkit.train.gguf_read` instead of parsing every metadata value into its own
numpy slice several times, dequantizes in cache-sized chunks, and builds the tokenizer straight from the
vocabulary and merges.

What it reproduces, per tensor (GGUF name -> HF name, numpy shapes):

    token_embd.weight          (vocab, hidden)   -> model.embed_tokens.weight
    output_norm.weight         (hidden,)         -> model.norm.weight
    output.weight              (vocab, hidden)   -> lm_head.weight (absent: tied to the embeddings)
    blk.N.attn_norm.weight     (hidden,)         -> model.layers.N.input_layernorm.weight
    blk.N.ffn_norm.weight      (hidden,)         -> model.layers.N.post_attention_layernorm.weight
    blk.N.attn_{q,k,v,output}  (out, in)         -> model.layers.N.self_attn.{q,k,v,o}_proj.weight
    blk.N.ffn_{gate,up,down}   (out, in)         -> model.layers.N.mlp.{gate,up,down}_proj.weight

llama.cpp stores the rows of q (``n_head`` heads) and k (``n_kv_head`` heads) interleaved for its rotary
layout: HF row ``(h, t, d)`` is GGUF row ``(h, d, t)`` for ``t in {0, 1}``, ``d < head_dim / 2``. We undo that
by picking rows of the *quantized* data (each row is whole blocks), which is exact and cheaper.

Anything outside this (another architecture, tokenizer, pre-tokenizer, tensor name, quant type, a bias)
raises :class:`~peftkit.train.gguf_read.UnsupportedGGUF`; the caller then uses transformers' own path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.train.errors import PeftkitError
from peftkit.train.gguf_read import GGML_TYPES, GGUFFile, UnsupportedGGUF, dequantize

# pre-tokenizer names converted with GPT-2's plain ByteLevel split (transformers overrides others by name)
BYTE_LEVEL_PRE = {"smollm"}
CONTROL, USER_DEFINED = 3, 4

_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_CHUNK_ROWS_BYTES = 1 << 18  # dequantize ~256 KiB of packed rows at a time (the fp32 result stays in L2)


def hf_name(gguf_name: str) -> str:
    """The HF Llama parameter name of a GGUF tensor; UnsupportedGGUF for one it does not know."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name == "output.weight":
        return "lm_head.weight"
    match = _LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    raise UnsupportedGGUF(f"tensor {gguf_name!r} has no Llama counterpart here")


def rotary_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's q/k interleave: ``(rows,)`` indices into the GGUF rows, for ``n_head``
    heads of ``rows // n_head`` rows each."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).transpose(0, 2, 1).reshape(-1)


# ---- config ----------------------------------------------------------------------------------------------
def config_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The config transformers derives from the metadata (its own GGUF key table, for architecture llama)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta = gguf.metadata
    name = meta.get("general.name", "")
    if "mistral" in str(name).lower():
        raise UnsupportedGGUF("a Llama GGUF named like a Mistral model (transformers loads it as mistral)")
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in gguf.tensors}
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target is None or target == -1:
            continue
        config[target] = _plain(value)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
        config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    return config


def _plain(value: Any) -> Any:
    """A metadata value as a JSON-able Python value (one-element arrays unwrapped, as transformers does)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def check_tensors(gguf: GGUFFile, config: dict[str, Any]) -> dict[str, str]:
    """GGUF name -> HF name of every tensor, after checking each against the config's shapes and the
    quant types we dequantize; UnsupportedGGUF on anything else."""
    needed = ("hidden_size", "vocab_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
    shape_keys = (*needed, "num_key_value_heads", "head_dim")
    if any(key not in config for key in needed):
        raise UnsupportedGGUF(f"metadata lacks {[key for key in needed if key not in config]}")
    if any(not isinstance(config[key], int) for key in shape_keys if key in config):
        raise UnsupportedGGUF(f"per-layer (non-integer) sizes in {[config.get(key) for key in shape_keys]}")
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, kv_heads = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim % 2:
        raise UnsupportedGGUF(f"head_dim {head_dim} is odd (the rotary row order pairs rows)")
    inter, layers = config["intermediate_size"], config["num_hidden_layers"]
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (vocab, hidden)
    for n in range(layers):
        prefix = f"model.layers.{n}."
        expected |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
    names = {}
    for name, info in gguf.tensors.items():
        target = hf_name(name)
        if info.ggml_type not in GGML_TYPES:
            raise UnsupportedGGUF(f"tensor {name!r} has ggml type {info.ggml_type} (reads F32/F16/Q4_1/Q8_0)")
        if expected.get(target) != info.shape:
            raise UnsupportedGGUF(f"tensor {name!r} is {list(info.shape)}, expected {expected.get(target)}")
        names[name] = target
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise UnsupportedGGUF(f"the GGUF lacks {len(missing)} Llama tensors, e.g. {missing[0]}")
    return names


# ---- weights ---------------------------------------------------------------------------------------------
def write_weights(gguf: GGUFFile, names: dict[str, str], config: dict[str, Any], path: Path) -> None:
    """Every tensor dequantized to fp32 into one safetensors file at ``path`` (metadata ``format: pt``),
    written straight from the dequantization buffers; q/k rows back in HF's rotary order."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    entries, offset = {}, 0
    for name, target in names.items():
        shape = gguf.tensors[name].shape
        size = int(np.prod(shape, dtype=np.int64)) * 4
        entries[target] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for name, target in names.items():
            info = gguf.tensors[name]
            raw = gguf.raw(name)  # (rows, bytes per row)
            if target.endswith(("q_proj.weight", "k_proj.weight")):
                n_head = heads if target.endswith("q_proj.weight") else kv_heads
                raw = raw[rotary_rows(raw.shape[0], n_head)]
            step = max(1, _CHUNK_ROWS_BYTES // max(1, raw.shape[1]))
            for start in range(0, raw.shape[0], step):
                out.write(dequantize(raw[start : start + step], info.ggml_type).data)


# ---- tokenizer -------------------------------------------------------------------------------------------
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: bytes that print as themselves (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``) keep their code point; the other 68 get ``U+0100`` onwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(0x100 + extra)
            extra += 1
    return mapping


def build_tokenizer(gguf: GGUFFile):
    """The byte-level BPE ``tokenizers.Tokenizer`` the metadata describes, and the special-token settings
    (``{bos_token, eos_token, unk_token, pad_token, chat_template, add_bos_token, ...}``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    meta = gguf.metadata
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UnsupportedGGUF(f"tokenizer {meta.get('tokenizer.ggml.model')!r} (converts byte-level 'gpt2')")
    if meta.get("tokenizer.ggml.pre") not in BYTE_LEVEL_PRE:
        raise UnsupportedGGUF(
            f"pre-tokenizer {meta.get('tokenizer.ggml.pre')!r} (converts {sorted(BYTE_LEVEL_PRE)})"
        )
    try:  # transformers swaps in its own split regex for the pre-tokenizer names in this table
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        raise UnsupportedGGUF("this transformers has no GGUF pre-tokenizer table to check against") from None
    if meta["tokenizer.ggml.pre"] in GGUF_PRE_TOKENIZER_SPLITS:
        raise UnsupportedGGUF(
            f"transformers gives pre-tokenizer {meta['tokenizer.ggml.pre']!r} its own split"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise UnsupportedGGUF("a byte-level tokenizer without merges")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    types = np.zeros(len(tokens), np.int32) if types is None else np.asarray(types)
    if len(types) != len(tokens):
        raise PeftkitError(f"{gguf.path}: {len(types)} token types for {len(tokens)} tokens")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        if not alphabet.issuperset(token):
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    control = [tokens[i] for i in np.flatnonzero(types == CONTROL) if alphabet.issuperset(tokens[i])]
    if np.any(types == USER_DEFINED):
        raise UnsupportedGGUF("user-defined (added, non-special) tokens")
    special = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            raise PeftkitError(
                f"{gguf.path}: tokenizer.ggml.{key}_token_id is {token_id}, expected an id below {len(tokens)}"
            )
        special[f"{name}_token"] = tokens[int(token_id)] if token_id is not None else None
    added = dict.fromkeys([*control, *(t for t in special.values() if t is not None)])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added])
    settings: dict[str, Any] = dict(special)
    if "tokenizer.chat_template" in meta:
        settings["chat_template"] = meta["tokenizer.chat_template"]
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in meta:
            settings[flag] = bool(meta[f"tokenizer.ggml.{flag}"])
    return tokenizer, settings


# ---- the folder ------------------------------------------------------------------------------------------
def convert_llama_gguf(gguf_path: Path, folder: Path) -> None:
    """Write the HF folder of a Llama GGUF into the existing (empty, temporary) ``folder``.

    Raises UnsupportedGGUF (nothing the caller should keep was written) when the file is outside what this
    converter reproduces exactly, PeftkitError when the file is malformed."""
    with GGUFFile(gguf_path) as gguf:
        if gguf.metadata.get("general.architecture") != "llama":
            raise UnsupportedGGUF(
                f"architecture {gguf.metadata.get('general.architecture')!r} (converts llama)"
            )
        config = config_dict(gguf)
        names = check_tensors(gguf, config)
        tokenizer, settings = build_tokenizer(gguf)
        write_weights(gguf, names, config, folder / "model.safetensors")
    _save_config(config, folder)
    _save_tokenizer(tokenizer, settings, folder)


def _save_config(config: dict[str, Any], folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig

    hf_config = LlamaConfig.from_dict(dict(config))
    hf_config.dtype = torch.float32
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(folder)
    GenerationConfig.from_model_config(hf_config).save_pretrained(folder)


def _save_tokenizer(tokenizer, settings: dict[str, Any], folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **settings).save_pretrained(folder)
