"""The README's compatibility table equals what the code says today (see `tests/compat_table.py`)."""

from __future__ import annotations

import peft

import peftkit

from . import compat_table


def test_readme_compatibility_section_is_current() -> None:
    section = compat_table.readme_section(compat_table.README.read_text(encoding="utf-8"))
    assert section is not None, (
        f"README.md lacks '{compat_table.HEADING}'; run python -m tests.compat_table --write"
    )
    assert section == compat_table.render(), (
        "README compatibility table is stale: python -m tests.compat_table --write"
    )


def test_every_reference_name_has_a_status_and_supported_ones_import() -> None:
    for name in peft.__all__:
        state, _ = compat_table.status(name)
        if state in ("supported", "refused"):
            assert hasattr(peftkit, name), name


def test_refused_names_raise_with_their_reason() -> None:
    refused = [n for n in peft.__all__ if compat_table.status(n)[0] == "refused"]
    assert refused == []  # PeftMixedModel, the last refused name, is implemented (tests/test_mixed_model.py)
