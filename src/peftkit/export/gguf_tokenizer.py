"""A Hugging Face BPE tokenizer folder as llama.cpp's GGUF tokenizer metadata (`tokenizer.ggml.*`).

llama.cpp reads a byte-level BPE tokenizer (GPT-2 style: Llama-3, SmolLM, Qwen2, Mistral-Nemo, GPT-2 ...) as
`tokenizer.ggml.model = "gpt2"` with the vocabulary as a list of token strings indexed by id (ids with no token
filled as `[PADn]`), a token type per id (1 normal, 3 control for special added tokens, 4 user-defined for
other added tokens), the merges as "left right" strings, the special token ids and the chat template. The
pre-tokenizer name (`tokenizer.ggml.pre`) is llama.cpp's own label for the regex its converter recognised;
it cannot be derived from tokenizer.json here, so the caller passes it (e.g. copied from the base model's
GGUF) or leaves it out (llama.cpp then uses its default pre-tokenizer and warns).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


class TokenizerExportError(ValueError):
    """A tokenizer llama.cpp's gpt2 BPE metadata cannot describe, naming the file and what was found."""


def tokenizer_metadata(folder: str | Path, vocab_size: int) -> dict[str, Any]:
    """{tokens, token_types, merges} of `folder`/tokenizer.json (a byte-level BPE), `vocab_size` ids long."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerExportError(f"{path}: not found; the GGUF needs the base model's tokenizer.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerExportError(
            f"{path}: model.type is {model.get('type')!r}; only byte-level BPE tokenizers (gpt2-style) are "
            "exported to GGUF here"
        )
    by_id: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(by_id, NORMAL)
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise TokenizerExportError(
            f"{path}: token id {max(by_id)} is outside the model's vocab_size {vocab_size}"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, USER_DEFINED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "token_types": token_types, "merges": merges}


def add_tokenizer(writer: Any, folder: str | Path, vocab_size: int, pre: str | None) -> None:
    """Write the tokenizer of `folder` (tokens, types, merges, special ids, chat template) into `writer`."""
    import gguf

    meta = tokenizer_metadata(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    # merges, bos/eos/unk/pad ids, add_bos_token and the chat template, as llama.cpp's converter reads them
    special = gguf.SpecialVocab(str(folder), load_merges=False, n_vocab=vocab_size)
    special.merges = meta["merges"]
    special.add_special_token.setdefault("bos", False)  # no template adding BOS: HF adds none, say so
    special.add_to_gguf(writer, quiet=True)
