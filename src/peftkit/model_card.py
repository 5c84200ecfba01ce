"""The `README.md` model card written beside a saved adapter, as HF peft's `save_pretrained` writes one.

The card is YAML metadata between `---` lines (what the Hugging Face Hub reads: `library_name`, `tags`,
`base_model`, `pipeline_tag`) followed by free text. A card the user already wrote is updated, never
replaced: their text and metadata stay, we only add missing keys, union the tags, and add one
"Framework versions" line.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from .atomic_files import atomic_write_bytes

README_NAME = "README.md"
_VERSIONS_HEADING = "### Framework versions"


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a card; a card without a valid `---` block has empty metadata."""
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            try:
                data = yaml.safe_load(text[3:end]) or {}
            except yaml.YAMLError:
                data = None
            if isinstance(data, dict):
                return data, text[end + len("\n---") :].lstrip("\n")
    return {}, text


def _new_body(base_model: str | None, methods: list[str]) -> str:
    base = f"`{base_model}`" if base_model else "its base model"
    return (
        "# Adapter\n\n"
        f"A parameter-efficient adapter ({', '.join(methods)}) for {base}, saved by peftkit in the "
        "Hugging Face peft file layout (`adapter_config.json` + `adapter_model.safetensors`).\n\n"
        "## How to load\n\n"
        "```python\n"
        "from peftkit import PeftModel\n\n"
        "model = PeftModel.from_pretrained(base_model, adapter_folder)\n"
        "```\n\n"
        "## Training details\n\n"
        "[More information needed]\n"
    )


def write_model_card(
    directory: str,
    base_model: str | None,
    methods: list[str],
    tags: list[str],
    pipeline_tag: str | None,
    library_version: str,
) -> None:
    """Create `directory/README.md`, or update the one there (keeping every line the user wrote)."""
    path = os.path.join(directory, README_NAME)
    existing = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            existing = fh.read()
    meta, body = _split_front_matter(existing)
    if not existing:
        body = _new_body(base_model, methods)
    meta["library_name"] = "peft"  # the Hub's loader for this file layout
    old_tags = meta.get("tags") or []
    meta["tags"] = sorted(set(old_tags if isinstance(old_tags, list) else [old_tags]) | set(tags))
    if base_model and "base_model" not in meta:
        meta["base_model"] = base_model
    if pipeline_tag and not meta.get("pipeline_tag"):
        meta["pipeline_tag"] = pipeline_tag
    version_line = f"- peftkit {library_version}"
    lines = body.rstrip("\n").split("\n")
    if version_line not in lines:
        if _VERSIONS_HEADING in lines:
            at = lines.index(_VERSIONS_HEADING) + 1
            lines.insert(at + 1 if at < len(lines) and not lines[at] else at, version_line)
        else:
            lines += ["", _VERSIONS_HEADING, "", version_line]
    header = yaml.safe_dump(meta, sort_keys=True, allow_unicode=True)
    atomic_write_bytes(path, (f"---\n{header}---\n\n" + "\n".join(lines) + "\n").encode())
