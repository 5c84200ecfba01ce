"""The packed shared-prefix attention equals SDPA with the packed mask (outputs and gradients), and the packed
training forward uses it in every layer."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peftkit import attention_functions
from peftkit import packed_attention as pa
from peftkit import shared_prefix as sp


class _Attention(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def _qkv(length: int, heads: int, kv: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, n, length, dim, generator=g, requires_grad=True) for n in (heads, kv, kv)
    ]  # query, key, value


@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("lengths", [(5, 1, 7, 3), (4,), (2, 0, 6)], ids=["uneven", "one_row", "empty_row"])
def test_equals_sdpa_with_the_packed_mask(heads, kv, lengths):
    prefix = 9
    keep = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    rows, _, allowed = sp.packed_layout(keep, prefix)
    length = prefix + rows.numel()
    module = _Attention(heads // kv)
    grad_out = torch.randn(1, length, heads, 16, generator=torch.Generator().manual_seed(5))

    def run(packed: bool):
        q, k, v = _qkv(length, heads, kv)
        mask = allowed[None, None]
        if packed:
            pa._active = pa.segments_of(rows, prefix)
            try:
                out, _ = pa.packed_attention_forward(module, q, k, v, mask, scaling=0.3)
            finally:
                pa._active = None
        else:
            out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
        out.backward(grad_out)
        return out.detach(), q.grad, k.grad, v.grad

    for name, mine, reference in zip(("output", "dq", "dk", "dv"), run(True), run(False)):
        assert mine.shape == reference.shape, name
        torch.testing.assert_close(mine, reference, atol=2e-6, rtol=1e-5, msg=name)


def test_other_lengths_and_inactive_fall_back_to_sdpa(monkeypatch):
    rows = torch.tensor([0, 0, 1])
    q, k, v = _qkv(6, 4, 2)
    calls = []
    monkeypatch.setattr(
        "peftkit.attention_functions.sdpa_attention_forward",
        lambda *a, **kw: calls.append(a[1].shape[2]) or (None, None),
    )
    pa.packed_attention_forward(_Attention(2), q, k, v, None)  # nothing active
    pa._active = pa.segments_of(rows, prefix=4)  # length 7, not 6
    try:
        pa.packed_attention_forward(_Attention(2), q, k, v, None)
        pa.packed_attention_forward(_Attention(2), *_qkv(7, 4, 2), None, dropout=0.1)
    finally:
        pa._active = None
    assert calls == [6, 6, 7]


def test_packed_training_forward_runs_it_in_every_layer(monkeypatch):
    from tests.models import tiny_llama
    from tests.perf.test_shared_prefix import _batch, _lora

    model = _lora(tiny_llama())
    used, fallbacks = [], []
    real = pa.packed_attention_forward

    def counting(module, query, key, value, mask, **kwargs):
        call = attention_functions.Call(
            module, query, key, value, mask, kwargs.get("dropout", 0.0), kwargs.get("is_causal"), {}
        )
        used.append(pa._applies(call))
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(attention_functions.AttentionInterface._global_mapping, pa.NAME, counting)
    monkeypatch.setattr(
        "peftkit.attention_functions.sdpa_attention_forward", lambda *a, **kw: fallbacks.append(1)
    )
    model(**_batch()).loss.backward()
    assert used == [True] * model.config.num_hidden_layers and not fallbacks
    assert model.config._attn_implementation == "sdpa"  # switched back after the call
