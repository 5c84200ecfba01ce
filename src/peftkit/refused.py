"""Names HF peft exports that peftkit has on purpose but refuses, with an error that says why and what to use.

Each refused object carries `__peftkit_refused__` (the reason), which the README's compatibility table reads.
"""

from __future__ import annotations

from typing import Any

MIXED_REASON = (
    "PeftMixedModel (adapters of different methods in one model) is not supported by peftkit; one PeftModel "
    "holds adapters of one method: use get_peft_model / PeftModel, or merge_and_unload() one method's adapter "
    "into the weights before adding another's"
)


class PeftMixedModel:
    """Refused: mixing methods in one model. Constructing or loading one raises NotImplementedError."""

    __peftkit_refused__ = MIXED_REASON

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(MIXED_REASON)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> PeftMixedModel:
        raise NotImplementedError(MIXED_REASON)
