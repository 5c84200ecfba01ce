"""No-grad inference with LoRA folded into a scratch weight (`inference_fold`) equals the unfolded layers, and
the fold is dropped or rebuilt whenever what it was built from changes (one test per case)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit.inference_fold import generating, is_folded
from peftkit.tuners.lora import LoraLinear
from tests.models import tiny_gpt2, tiny_llama, token_inputs


def _lora(factory=tiny_llama, **kw):
    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(factory(), LoraConfig(**{**config, **kw})).eval()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def _folded(model) -> int:
    return sum(is_folded(m) for m in _layers(model))


def _unfolded(model, fn):
    peftkit.set_inference_fold(False)
    try:
        return fn()
    finally:
        peftkit.set_inference_fold(True)


def _logits(model, inputs):
    """No-grad logits as inside `generate` (the only place the fold is used)."""
    with torch.no_grad(), generating():
        return model(**inputs).logits


@pytest.fixture
def model():
    return _lora()


@pytest.fixture
def inputs():
    return token_inputs(batch=3, seq=10)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_folded_forward_equals_unfolded(factory, inputs):
    m = _lora(factory)
    ref = _unfolded(m, lambda: _logits(m, inputs))
    assert _folded(m) == 0
    got = _logits(m, inputs)
    assert _folded(m) == len(_layers(m)) > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(_logits(m, inputs), got)  # the second call reuses the fold


def test_greedy_generation_identical(model, inputs):
    def gen():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)

    ref = _unfolded(model, gen)
    assert torch.equal(gen(), ref)
    assert _folded(model) > 0


def test_grad_path_never_folds(model, inputs):
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert _folded(model) == 0
    assert all(m.lora_A["default"].weight.grad is not None for m in _layers(model))


def test_dropout_in_train_mode_not_folded(inputs):
    m = _lora(lora_dropout=0.5).train()
    with torch.no_grad():
        m(**inputs)
    assert _folded(m) == 0
    m.eval()  # dropout is the identity in eval mode: folding is exact again
    ref = _unfolded(m, lambda: _logits(m, inputs))
    torch.testing.assert_close(_logits(m, inputs), ref, rtol=1e-5, atol=1e-5)
    assert _folded(m) > 0


def test_train_drops_and_optimizer_step_rebuilds(model, inputs):
    before = _logits(model, inputs)
    model.train()
    assert _folded(model) == 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    model.eval()
    after = _logits(model, inputs)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _unfolded(model, lambda: _logits(model, inputs)), rtol=1e-5, atol=1e-5)


def test_in_place_edit_without_train_rebuilds(model, inputs):
    _logits(model, inputs)
    with torch.no_grad():
        for m in _layers(model):
            m.lora_B["default"].weight.mul_(2.0)  # bumps _version: the key no longer matches
    torch.testing.assert_close(
        _logits(model, inputs), _unfolded(model, lambda: _logits(model, inputs)), rtol=1e-5, atol=1e-5
    )


def test_set_adapter_switches(model, inputs):
    torch.manual_seed(1)
    model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    first = _logits(model, inputs)
    model.set_adapter("other")
    assert _folded(model) == 0
    other = _logits(model, inputs)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(other, _unfolded(model, lambda: _logits(model, inputs)), rtol=1e-5, atol=1e-5)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, inputs), first)


def test_disable_adapter_gives_base(model, inputs):
    _logits(model, inputs)
    with model.disable_adapter():
        assert _folded(model) == 0
        base = _logits(model, inputs)
        assert _folded(model) == 0
    with torch.no_grad():
        ref = model.get_base_model()
        peftkit.set_inference_fold(False)
        try:
            with model.disable_adapter():
                torch.testing.assert_close(base, ref(**inputs).logits)
        finally:
            peftkit.set_inference_fold(True)


def test_merge_and_unmerge(model, inputs):
    folded = _logits(model, inputs)
    model.merge_adapter()
    assert _folded(model) == 0
    merged = _logits(model, inputs)  # merged layers compute no update: nothing folded on top of the merge
    assert _folded(model) == 0
    torch.testing.assert_close(merged, folded, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    assert _folded(model) == 0
    torch.testing.assert_close(_logits(model, inputs), folded, rtol=1e-4, atol=1e-5)


def test_requires_grad_change_drops(model, inputs):
    _logits(model, inputs)
    model.set_requires_grad("default", requires_grad=False)
    assert _folded(model) == 0


def test_load_adapter_tensors_rebuilds(model, inputs, tmp_path):
    torch.manual_seed(3)
    donor = _lora()
    with torch.no_grad():
        for m in _layers(donor):
            m.lora_B["default"].weight.normal_()
    donor.save_pretrained(tmp_path)
    _logits(model, inputs)
    peftkit.set_peft_model_state_dict(model, peftkit.load_peft_weights(str(tmp_path)))  # `.data` writes
    torch.testing.assert_close(_logits(model, inputs), _logits(donor, inputs), rtol=1e-5, atol=1e-5)


def test_mixed_batch_rows_not_folded(model, inputs):
    torch.manual_seed(1)
    model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    assert _folded(model) == 0
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                ref = _logits(model, row)
        else:
            model.set_adapter(name)
            ref = _logits(model, row)
        torch.testing.assert_close(mixed[i : i + 1], ref, rtol=1e-4, atol=1e-5)


def test_delete_adapter_drops(model, inputs):
    torch.manual_seed(1)
    model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.set_adapter("other")
    _logits(model, inputs)
    model.delete_adapter("other")
    assert _folded(model) == 0


def test_fold_built_in_inference_mode_serves_no_grad(model, inputs):
    with torch.inference_mode(), generating():
        first = model(**inputs).logits
    assert _folded(model) > 0
    torch.testing.assert_close(_logits(model, inputs), first.clone())
    model.train()  # and training afterwards is untouched by the inference tensors
    model(**inputs, labels=inputs["input_ids"]).loss.backward()


def test_no_fold_without_room_for_the_copy(model, inputs, monkeypatch):
    """A copy that would leave the device under RESERVE free is not made: the layer runs unfolded, same logits."""
    from peftkit import inference_fold

    ref = _unfolded(model, lambda: _logits(model, inputs))
    free, total = inference_fold._host_memory()
    assert free is not None and 0 < free <= total  # /proc/meminfo read on this (Linux) machine
    # held at this reading: the machine's free memory moves (other processes), and a tiny model's copies are
    # a few kB, so a live reading taken a moment later could find room again
    monkeypatch.setattr(inference_fold, "_host_memory", lambda: (free, total))
    monkeypatch.setattr(inference_fold, "RESERVE", free / total)  # no copy fits above that
    got = _logits(model, inputs)
    assert _folded(model) == 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(inference_fold, "RESERVE", 0.0)
    model.train().eval()  # a switch drops the remembered "no room"; the next call folds
    _logits(model, inputs)
    assert _folded(model) == len(_layers(model))


def test_plain_no_grad_forward_never_folds(model, inputs):
    """An evaluation loss or Trainer's eval loop (a no-grad forward outside generate) runs unfolded."""
    with torch.no_grad():
        model(**inputs)
    assert _folded(model) == 0


def test_fused_optimizer_step_without_a_mode_switch_is_seen(model, inputs):
    """A fused AdamW updates the adapter in place without bumping `_version`; the next generate call compares
    the adapter tensors with the fold's copies and rebuilds (before: a stale fold, eval loss off by 1e-3)."""
    ids = inputs["input_ids"][:1]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(input_ids=ids, **kw)
    assert _folded(model) > 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.5, fused=True)
    loss = model(**inputs, labels=inputs["input_ids"]).logits.square().mean()  # grad on: unfolded
    loss.backward()
    optimizer.step()  # no model.train(): nothing drops the fold
    with torch.no_grad():
        got = model.generate(input_ids=ids, **kw, output_scores=True, return_dict_in_generate=True)
        ref = _unfolded(
            model,
            lambda: model.generate(input_ids=ids, **kw, output_scores=True, return_dict_in_generate=True),
        )
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), rtol=1e-5, atol=1e-5)


def test_each_generate_call_checks_each_layer_once(model, inputs, monkeypatch):
    """Within one generate call a layer's fold is checked at its first token and reused untouched after
    (`current_fold`); the next call checks again, and switching the adapter off inside a call is seen."""
    from peftkit import inference_fold

    checks = {"n": 0}
    real = inference_fold.folded_weight

    def counted(*a, **k):
        checks["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr("peftkit.tuners.lora_layers.folded_weight", counted)
    layers = len(_layers(model))

    def gen():
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
            )

    first = gen()
    assert checks["n"] == layers  # 6 tokens, one check per layer
    assert torch.equal(gen(), first) and checks["n"] == 2 * layers
    with torch.no_grad(), generating():
        folded = model(**inputs).logits
        with model.disable_adapter():  # drops the folds: the base runs, not the stale fast path
            base = model(**inputs).logits
        assert not torch.allclose(base, folded)
        with model.disable_adapter():
            torch.testing.assert_close(_unfolded(model, lambda: model(**inputs).logits), base)
    x = torch.randn(3, 1, _layers(model)[0].in_features)
    assert inference_fold.current_fold(_layers(model)[0], x) is None  # outside a generate call: never


def test_fold_layout_follows_the_decode_batch():
    """CPU decode steps of >= IN_MAJOR_ROWS rows use an (in, out)-contiguous fold (MKL's small-M GEMM is faster
    from it), one row the (out, in) one; the tokens equal the unfolded model's either way."""
    from peftkit import inference_fold

    model = _lora()

    def layouts():
        return {inference_fold._is_in_major(m.__dict__["_inference_fold"][1]) for m in _layers(model)}

    for batch, in_major in ((4, True), (1, False), (3, True)):
        inputs = token_inputs(batch=batch, seq=7)

        def gen(inputs=inputs):
            with torch.no_grad():
                return model.generate(
                    **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
                )

        folded = gen()
        assert layouts() == {in_major}
        assert torch.equal(folded, _unfolded(model, gen))
