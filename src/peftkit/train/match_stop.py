"""Early stop for exact match: a row whose greedy output can no longer equal its reference stops generating.

Exact match compares the stripped decoded output with the stripped reference. A row is stopped only when that
comparison provably fails, whatever tokens would follow: the decoded text so far, with all whitespace removed
(and without the replacement characters an incomplete multi-byte character leaves at its end), is not a prefix
of the reference with all whitespace removed. Decoding more tokens only appends text (tokenizer clean-up only
ever deletes spaces), so the final output's non-space characters start with these and the row is a miss; a
row that is still a possible hit runs exactly as before, so its answer, and the score, are unchanged.

The base model before training answers in prose ("The date is ..."), so every row of the held-out set is a
provable miss after its first token or two, and the before-training evaluation costs one prefill instead of
`max_new_tokens` decode steps.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

_REPLACEMENT = "\ufffd"


def squeeze(text: str) -> str:
    """``text`` with every whitespace character removed."""
    return "".join(text.split())


def can_still_match(generated: str, reference: str) -> bool:
    """False only if no continuation of ``generated`` (decoded so far) can strip to ``reference.strip()``."""
    return squeeze(reference).startswith(squeeze(generated.rstrip(_REPLACEMENT)))


class StopOnMismatch(StoppingCriteria):
    """Marks a row finished once its new tokens can no longer decode to its reference (``can_still_match``).

    references: one reference answer per row, or None for a row that must run to its end (the samples the
    report shows); start: the column where the new tokens begin in ``input_ids`` ``[batch, start + new]``.
    """

    def __init__(self, tokenizer, references: list[str | None], start: int):
        self.tokenizer, self.references, self.start = tokenizer, references, start

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        stop = [ref is not None and not can_still_match(t, ref) for t, ref in zip(texts, self.references)]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)
