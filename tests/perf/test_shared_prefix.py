"""Shared-prefix training equals the plain forward: loss and every trainable gradient; and it stays off
where it would not be exact."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit import shared_prefix as sp
from tests.models import VOCAB, tiny_llama


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
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
    )
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("build", [tiny_llama, _tiny_gpt2_no_dropout], ids=["llama", "gpt2"])
def test_equals_plain_forward(build, monkeypatch):
    model = _lora(build())
    batch = _batch()
    calls = []
    real = sp.run_with_shared_prefix
    monkeypatch.setattr(
        "peftkit.fused_loss.run_with_shared_prefix", lambda *a: calls.append(a[2]) or real(*a)
    )
    loss_on, grads_on = _loss_and_grads(model, batch, True)
    assert calls == [10]  # 10 common tokens, the first label is at position 11
    loss_off, grads_off = _loss_and_grads(model, batch, False)
    assert len(calls) == 1
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)


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


def _prefix_runs(model: torch.nn.Module, batch: dict, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = sp.run_with_shared_prefix
    monkeypatch.setattr(
        "peftkit.fused_loss.run_with_shared_prefix", lambda *a: calls.append(a[2]) or real(*a)
    )
    model(**batch).loss.backward()
    return calls


def test_off_with_dropout_or_switch(monkeypatch):
    batch = _batch()
    assert _prefix_runs(_lora(tiny_llama(), dropout=0.1), batch, monkeypatch) == []  # LoRA dropout
    gpt2_default = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )
    assert _prefix_runs(_lora(gpt2_default), batch, monkeypatch) == []  # GPT-2's own dropouts (0.1)
    model = _lora(tiny_llama())
    model.shared_prefix = False
    assert _prefix_runs(model, batch, monkeypatch) == []
    model.shared_prefix = True
    peftkit.set_shared_prefix(False)
    try:
        assert _prefix_runs(model, batch, monkeypatch) == []
    finally:
        peftkit.set_shared_prefix(True)
    assert _prefix_runs(model, batch, monkeypatch) == [10]


def test_off_for_short_prefix_single_row_and_eval(monkeypatch):
    model = _lora(tiny_llama())
    assert _prefix_runs(model, _batch(prefix=sp.MIN_PREFIX - 1), monkeypatch) == []  # 6 < MIN_PREFIX
    assert _prefix_runs(model, _batch(rows=1), monkeypatch) == []
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


def test_eval_loss_uses_shared_prefix_and_matches_plain(monkeypatch):
    from peftkit.train.data import Tokenized
    from peftkit.train.evaluate import eval_loss

    model = _lora(tiny_llama())
    batch = _batch()
    items = [
        Tokenized(input_ids=ids[m.bool()].tolist(), labels=lab[m.bool()].tolist(), prompt_len=0)
        for ids, m, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])
    ]
    calls: list[int] = []
    real = sp.run_with_shared_prefix
    monkeypatch.setattr(
        "peftkit.fused_loss.run_with_shared_prefix", lambda *a: calls.append(a[2]) or real(*a)
    )
    fast = eval_loss(model, items, pad_id=0)
    assert calls and model.training  # the shared prefix ran; the model's mode is restored
    peftkit.set_fused_causal_lm_loss(False)
    try:
        plain = eval_loss(model, items, pad_id=0)
    finally:
        peftkit.set_fused_causal_lm_loss(True)
    assert len(calls) == 1 and fast["tokens"] == plain["tokens"] == 9
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-5)
