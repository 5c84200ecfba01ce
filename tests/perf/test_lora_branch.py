"""The in-place LoRA branch, the one-node LoRA Linear and the merged (one-GEMM) LoRA Linear equal the
straightforward `base(x) + B(A(dropout(x)) * s)`: output and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import LoraConfig, get_peft_model
from peftkit.functional.lora_branch import lora_branch_, lora_linear
from peftkit.functional.lora_merged import merged_lora_linear
from peftkit.inject import Conv1D
from peftkit.tuners import lora_layers as lora_module
from peftkit.tuners.lora import LoraLinear
from tests.models import tiny_gpt2, tiny_llama, token_inputs


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_grad", [False, True])
def test_functional_equals_plain(p, x_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g).requires_grad_(x_grad)
    W = torch.randn(10, 12, generator=g).requires_grad_()
    A = torch.randn(4, 12, generator=g).requires_grad_()
    B = torch.randn(10, 4, generator=g).requires_grad_()
    leaves = [t for t in (x, W, A, B) if t.requires_grad]
    upstream = torch.randn(3, 5, 10, generator=g)

    torch.manual_seed(7)
    ref = F.linear(x, W) + F.linear(F.linear(F.dropout(x, p, training=True), A) * 0.5, B)
    ref_grads = torch.autograd.grad(ref, leaves, upstream)
    torch.manual_seed(7)  # the same dropout mask
    got = lora_branch_(F.linear(x, W), x, A, B, 0.5, p, training=True)
    got_grads = torch.autograd.grad(got, leaves, upstream)

    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_dims", [2, 3])
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("transposed", [False, True])
def test_one_node_functional_equals_plain(p, x_dims, x_grad, bias, transposed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 5, 12) if x_dims == 3 else (15, 12), generator=g).requires_grad_(x_grad)
    W = torch.randn(12, 10, generator=g).T if transposed else torch.randn(10, 12, generator=g)  # as Conv1D
    b = None if bias == "none" else torch.randn(10, generator=g).requires_grad_(bias == "trainable")
    A = torch.randn(4, 12, generator=g).requires_grad_()
    B = torch.randn(10, 4, generator=g).requires_grad_()
    leaves = [t for t in (x, b, A, B) if t is not None and t.requires_grad]
    upstream = torch.randn(*x.shape[:-1], 10, generator=g)

    torch.manual_seed(7)
    ref = F.linear(x, W, b) + F.linear(F.linear(F.dropout(x, p, training=True), A) * 0.5, B)
    ref_grads = torch.autograd.grad(ref, leaves, upstream)
    torch.manual_seed(7)  # the same dropout mask
    got = lora_linear(x, W, b, A, B, 0.5, p, training=True)
    assert type(got.grad_fn).__name__ == "_LoraLinearBackward"  # one node: base GEMM and branch
    got_grads = torch.autograd.grad(got, leaves, upstream)

    torch.testing.assert_close(got, ref)
    for a, c in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, c)


def _loss_and_grads(model, inputs, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("path", ["lora_linear", "lora_branch_"])
def test_model_fast_paths_equal_plain(make, dropout, path, monkeypatch):
    config = LoraConfig(
        r=4, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(make(), config).train()
    inputs = token_inputs(batch=2, seq=9)
    if path == "lora_branch_":  # the base layer's own forward, then the branch added in place
        monkeypatch.setattr(LoraLinear, "_one_node_ok", lambda self, *a: False)
    calls = []
    real = getattr(lora_module, path)
    monkeypatch.setattr(lora_module, path, lambda *a, **k: calls.append(1) or real(*a, **k))
    fast_loss, fast = _loss_and_grads(model, inputs)
    n_layers = sum(isinstance(m, LoraLinear) for m in model.modules())
    assert n_layers and len(calls) == n_layers, (len(calls), n_layers)  # every layer took the path
    monkeypatch.setattr(LoraLinear, "_one_node_ok", lambda self, *a: False)
    monkeypatch.setattr(LoraLinear, "_in_place_ok", lambda self, *a: False)
    plain_loss, plain = _loss_and_grads(model, inputs)

    torch.testing.assert_close(fast_loss, plain_loss)
    assert fast.keys() == plain.keys() and len(fast) > 4
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], msg=name)


def test_in_place_path_is_taken_and_eval_output_matches(monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(2, 3, layer.in_features)
    assert layer._in_place_ok("default", layer.base_layer(x), x)
    with torch.no_grad():
        fast = model(**token_inputs()).logits
        monkeypatch.setattr(LoraLinear, "_in_place_ok", lambda self, *a: False)
        plain = model(**token_inputs()).logits
    torch.testing.assert_close(fast, plain)


# the merged path (functional/lora_merged.py): one GEMM with W + s*B@A when there is no dropout -------------
def _plain_lora_linear(base, x, adapters):
    """The straightforward `base(x) + sum_k B_k(A_k(x)) * s_k`."""
    return base(x) + sum(F.linear(F.linear(x, A) * s, B) for A, B, s in adapters)


def _base_and_adapters(conv1d, n_adapters, trainable_bias, g):
    base = Conv1D(10, 12) if conv1d else torch.nn.Linear(12, 10)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g))
        base.bias.copy_(torch.randn(10, generator=g))
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(trainable_bias)
    adapters = [
        (
            torch.randn(4, 12, generator=g).requires_grad_(),
            torch.randn(10, 4, generator=g).requires_grad_(),
            s,
        )
        for s in (0.5, 2.0)[:n_adapters]
    ]
    return base, adapters


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("x_dims", [2, 3])
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("n_adapters", [1, 2])
@pytest.mark.parametrize("trainable_bias", [False, True])
def test_merged_functional_equals_plain(conv1d, x_dims, x_grad, n_adapters, trainable_bias):
    g = torch.Generator().manual_seed(0)
    base, adapters = _base_and_adapters(conv1d, n_adapters, trainable_bias, g)
    x = torch.randn((3, 5, 12) if x_dims == 3 else (15, 12), generator=g).requires_grad_(x_grad)
    upstream = torch.randn(*x.shape[:-1], 10, generator=g)
    leaves = [t for t in (x, base.bias, *(t for A, B, _ in adapters for t in (A, B))) if t.requires_grad]

    ref = _plain_lora_linear(base, x, adapters)
    w_rows = base.weight.T if conv1d else base.weight
    got = merged_lora_linear(x, w_rows, base.bias, adapters)

    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(ref, leaves, upstream)):
        torch.testing.assert_close(a, b)


def _layer(conv1d, n_adapters, trainable_bias):
    g = torch.Generator().manual_seed(1)
    base, _ = _base_and_adapters(conv1d, 1, trainable_bias, g)
    layer = LoraLinear(base)
    names = ["a", "b"][:n_adapters]
    for name in names:
        layer.update_layer(name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    layer.set_adapter(names)
    layer.base_layer.bias.requires_grad_(trainable_bias)  # as bias="all" / "lora_only" leave it
    return layer, names


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("x_dims", [2, 3])
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_layer_takes_merged_path_and_equals_plain(conv1d, x_dims, x_grad, n_adapters, monkeypatch):
    monkeypatch.setattr(lora_module, "_MERGED_MIN_ROWS", 4)
    layer, names = _layer(conv1d, n_adapters, trainable_bias=True)
    x = torch.randn((3, 5, 12) if x_dims == 3 else (15, 12)).requires_grad_(x_grad)
    upstream = torch.randn(*x.shape[:-1], 10)
    leaves = [p for p in layer.parameters() if p.requires_grad] + ([x] if x_grad else [])
    assert len(leaves) == 1 + 2 * n_adapters + x_grad  # bias, A and B per adapter, x

    got = layer(x)
    assert type(got.grad_fn).__name__ == "_MergedLoraLinearBackward"
    adapters = [(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n]) for n in names]
    ref = _plain_lora_linear(layer.base_layer, x, adapters)

    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(ref, leaves, upstream)):
        torch.testing.assert_close(a, b)


def test_merged_path_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(lora_module, "_MERGED_MIN_ROWS", 8)
    layer, _ = _layer(conv1d=False, n_adapters=1, trainable_bias=False)
    big, small = torch.randn(2, 4, 12), torch.randn(7, 12)

    def merged(x):
        return type(layer(x).grad_fn).__name__ == "_MergedLoraLinearBackward"

    assert merged(big) and not merged(small)  # too few rows: building W + s*B@A would not pay off
    with torch.no_grad():
        assert layer(big).grad_fn is None  # inference keeps the base GEMM + rank-r branch
    layer.base_layer.weight.requires_grad_(True)
    assert not merged(big)  # W would need a gradient
    layer.base_layer.weight.requires_grad_(False)
    layer.update_layer("drop", LoraConfig(r=4, lora_dropout=0.1))
    layer.set_adapter("drop")
    assert not merged(big)  # dropout active in training
    layer.eval()
    assert merged(big)  # dropout is a no-op in eval
    layer.train()
    layer.update_layer("dora", LoraConfig(r=4, use_dora=True))
    layer.set_adapter("dora")
    assert not merged(big)


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while running fn()."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_merged_path_saves_no_more_than_in_place_path(monkeypatch):
    monkeypatch.setattr(lora_module, "_MERGED_MIN_ROWS", 1)
    layer, _ = _layer(conv1d=False, n_adapters=1, trainable_bias=False)
    x = torch.randn(64, 12, requires_grad=True)
    merged = _saved_bytes(lambda: layer(x))
    monkeypatch.setattr(lora_module, "_MERGED_MIN_ROWS", 10**9)
    in_place = _saved_bytes(lambda: layer(x))
    assert 0 < merged <= in_place


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_model_merged_equals_plain(make, bias, monkeypatch):
    config = LoraConfig(
        r=4, bias=bias, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(make(), config).train()
    inputs = token_inputs(batch=2, seq=9)
    monkeypatch.setattr(lora_module, "_MERGED_MIN_ROWS", 1)
    merged_loss, merged = _loss_and_grads(model, inputs)
    monkeypatch.setattr(LoraLinear, "_merged_ok", lambda self, *a: False)
    monkeypatch.setattr(LoraLinear, "_one_node_ok", lambda self, *a: False)
    monkeypatch.setattr(LoraLinear, "_in_place_ok", lambda self, *a: False)
    plain_loss, plain = _loss_and_grads(model, inputs)

    torch.testing.assert_close(merged_loss, plain_loss)
    assert merged.keys() == plain.keys() and len(merged) > 4
    for name in plain:
        torch.testing.assert_close(merged[name], plain[name], msg=name)
