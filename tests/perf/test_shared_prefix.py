"""Shared-prefix training equals the plain forward: loss and every trainable gradient; and it stays off
where it would not be exact."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit import shared_prefix as sp
from tests.models import VOCAB, tiny_gpt2, tiny_llama


def _batch(prefix: int = 10, rows: int = 3, suffix=(6, 9, 4), pad_id: int = 0, seed: int = 1) -> dict:
    """Rows = one common prefix + own suffix of different lengths, right padded; labels on the last 3
    real tokens of each row (response-only)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, VOCAB, (prefix,), generator=g)
    seqs = [torch.cat([head, torch.randint(1, VOCAB, (n,), generator=g)]) for n in suffix[:rows]]
    width = max(len(s) for s in seqs)
    ids = torch.full((rows, width), pad_id)
    mask = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
        labels[i, len(s) - 3 : len(s)] = s[-3:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora(model: torch.nn.Module, dropout: float = 0.0) -> torch.nn.Module:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        lora_dropout=dropout,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config).train()


def _loss_and_grads(model: torch.nn.Module, batch: dict, shared: bool) -> tuple[torch.Tensor, dict]:
    model.shared_prefix = shared
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _tiny_gpt2_no_dropout() -> torch.nn.Module:
    return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)


@pytest.fixture
def prefix_calls(monkeypatch) -> list[int]:
    """The prefix lengths the fused path runs once (one entry per shared-prefix forward)."""
    calls: list[int] = []
    real = sp.run_with_shared_prefix
    monkeypatch.setattr(
        "peftkit.fused_loss.run_with_shared_prefix", lambda *a: calls.append(a[2]) or real(*a)
    )
    return calls


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "two_passes"])
@pytest.mark.parametrize("build", [tiny_llama, _tiny_gpt2_no_dropout], ids=["llama", "gpt2"])
def test_equals_plain_forward(build, packed, prefix_calls, monkeypatch):
    model = _lora(build())
    batch = _batch()
    calls = prefix_calls
    layouts = []
    real_layout = sp.packed_layout
    # (prefix, tokens packed after it) of each packed pass
    monkeypatch.setattr(
        sp, "packed_layout", lambda *a: layouts.append((a[1], int(a[0].sum()))) or real_layout(*a)
    )
    if not packed:  # longer than PACK_MAX: the prefix's KV cache broadcast to the batched suffixes
        monkeypatch.setattr(sp, "PACK_MAX", 0)
    loss_on, grads_on = _loss_and_grads(model, batch, True)
    assert calls == [10]  # 10 common tokens, the first label is at position 11
    # each row's own tokens but its last, which predicts no label (suffixes of 6, 9 and 4 tokens)
    assert layouts == ([(10, 5 + 8 + 3)] if packed else [])
    loss_off, grads_off = _loss_and_grads(model, batch, False)
    assert len(calls) == 1
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)


def test_feeds_a_label_is_every_position_before_the_rows_last_label():
    labels = torch.tensor(
        [
            [-100, -100, 5, 6, -100, -100],  # tokens after the last label feed nothing
            [-100, 7, -100, -100, 8, 9],  # the last token never does
            [-100, -100, -100, -100, -100, -100],  # a row without labels: nothing
        ]
    )
    want = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(sp.feeds_a_label(labels), want)


def test_common_prefix_length():
    batch = _batch(prefix=10)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert sp.common_prefix_length(ids, mask, labels) == 10
    labels = labels.clone()
    labels[:, 4] = 7  # a label inside the prefix: the prefix stops before the position that predicts it
    assert sp.common_prefix_length(ids, mask, labels) == 3
    left = batch["attention_mask"].flip(1)  # left padding: position 0 is not attended everywhere
    assert sp.common_prefix_length(ids, left, batch["labels"]) == 0
    ids2 = ids.clone()
    ids2[1, 5] = (ids2[1, 5] + 1) % VOCAB
    assert sp.common_prefix_length(ids2, mask, batch["labels"]) == 5
    assert sp.common_prefix_length(ids, mask, torch.full_like(ids, -100)) == 0


def _prefix_runs(model: torch.nn.Module, batch: dict, calls: list[int]) -> list[int]:
    """The shared-prefix runs of one training step of `model` (calls: the prefix_calls fixture)."""
    calls.clear()
    model(**batch).loss.backward()
    return list(calls)


def test_off_with_dropout_or_switch(prefix_calls):
    batch = _batch()
    assert _prefix_runs(_lora(tiny_llama(), dropout=0.1), batch, prefix_calls) == []  # LoRA dropout
    assert _prefix_runs(_lora(tiny_gpt2()), batch, prefix_calls) == []  # GPT-2's own dropouts (0.1)
    model = _lora(tiny_llama())
    model.shared_prefix = False
    assert _prefix_runs(model, batch, prefix_calls) == []
    model.shared_prefix = True
    peftkit.set_shared_prefix(False)
    try:
        assert _prefix_runs(model, batch, prefix_calls) == []
    finally:
        peftkit.set_shared_prefix(True)
    assert _prefix_runs(model, batch, prefix_calls) == [10]


def test_off_for_short_prefix_single_row_and_eval(prefix_calls):
    model = _lora(tiny_llama())
    assert _prefix_runs(model, _batch(prefix=sp.MIN_PREFIX - 1), prefix_calls) == []  # 7 < MIN_PREFIX
    assert _prefix_runs(model, _batch(rows=1), prefix_calls) == []
    model.eval()
    with torch.no_grad():
        assert model(**_batch()).logits is not None  # plain path, full logits


@pytest.mark.parametrize("wrap", [True, False], ids=["peft_model", "plain_transformers"])
def test_loss_only_equals_model_loss_in_eval(wrap):
    from peftkit.fused_loss import loss_only

    model = _lora(tiny_llama()) if wrap else tiny_llama()
    model.eval()
    batch = _batch()
    with torch.no_grad():
        want = model(**batch, num_items_in_batch=1).loss
        got = loss_only(model, batch, num_items_in_batch=1)
    assert got is not None and got.dim() == 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_eval_loss_uses_shared_prefix_and_matches_plain(prefix_calls):
    from peftkit.train.data import Tokenized
    from peftkit.train.evaluate import eval_loss

    model = _lora(tiny_llama())
    batch = _batch()
    items = [
        Tokenized(input_ids=ids[m.bool()].tolist(), labels=lab[m.bool()].tolist(), prompt_len=0)
        for ids, m, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])
    ]
    calls = prefix_calls
    fast = eval_loss(model, items, pad_id=0)
    assert calls and model.training  # the shared prefix ran; the model's mode is restored
    peftkit.set_fused_causal_lm_loss(False)
    try:
        plain = eval_loss(model, items, pad_id=0)
    finally:
        peftkit.set_fused_causal_lm_loss(True)
    assert len(calls) == 1 and fast["tokens"] == plain["tokens"] == 9
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_packed_layout_keeps_each_row_to_the_prefix_and_itself():
    keep = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # suffixes of 2, 3, 1 tokens
    rows, cols, allowed = sp.packed_layout(keep, prefix=2)
    assert rows.tolist() == [0, 0, 1, 1, 1, 2] and cols.tolist() == [0, 1, 0, 1, 2, 0]
    seg = [-1, -1, 0, 0, 1, 1, 1, 2]  # the packed sequence: prefix, row 0, row 1, row 2
    pos = [0, 1, 2, 3, 2, 3, 4, 2]  # each token's position in its own unpacked row
    want = [[pos[j] <= pos[i] and seg[j] in (-1, seg[i]) for j in range(8)] for i in range(8)]
    assert allowed.tolist() == want
