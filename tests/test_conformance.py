"""The battery every registered method, layer type and variant passes (cases in `tests/cases.py`)."""

from __future__ import annotations

import copy

import peft as hf_peft
import pytest
import torch

import peftkit
from peftkit.registry import all_methods

from .cases import CASES, Case
from .models import output_tensor

ATOL = 1e-5


def make_config(lib, case: Case):
    cls = type(peftkit.registry.get_method(case.peft_type).config_cls(**case.config)).__name__
    return getattr(lib, cls)(task_type=case.task_type, **case.config)


def build(lib, case: Case, seed: int = 0):
    torch.manual_seed(123)  # adapter init
    model = lib.get_peft_model(case.model(seed), make_config(lib, case))
    if case.perturb:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def perturb_trained_base_tensors(model, case: Case):
    """Noise on the trainable tensors that are not adapter tensors (biases trained with `bias="all"` or
    `"lora_only"`, `modules_to_save` heads): they start equal to the base's, so without this a save or a load
    that forgot them would pass every comparison."""
    prefix = peftkit.registry.get_method(case.peft_type).prefix
    g = torch.Generator().manual_seed(11)
    touched = []
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad and prefix not in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
                touched.append(n)
    return touched


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs)).float()


def is_prompt_learning(case: Case) -> bool:
    return peftkit.registry.get_method(case.peft_type).is_prompt_learning


def loss_of(model, case: Case, inputs) -> torch.Tensor:
    out = model(**inputs)
    y = output_tensor(out).float()
    if case.task_type == "CAUSAL_LM":
        y = y[:, -inputs["input_ids"].shape[1] :]  # prompt tuning's virtual tokens lengthen the logits
        return torch.nn.functional.cross_entropy(
            y[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten()
        )
    if case.task_type == "SEQ_CLS":
        return torch.nn.functional.cross_entropy(y, torch.arange(y.shape[0]) % y.shape[-1])
    return (y - torch.linspace(-1, 1, y.numel()).reshape(y.shape)).pow(2).mean()


ids = [c.id for c in CASES]


def test_every_method_has_cases():
    covered = {c.peft_type for c in CASES}
    assert set(all_methods()) <= covered, f"methods without conformance cases: {set(all_methods()) - covered}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_only_adapter_params_train_and_change(case: Case):
    model = build(peftkit, case)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    prefix = peftkit.registry.get_method(case.peft_type).prefix
    bias_mode = case.config.get("bias", "none")
    for n in trainable:
        assert prefix in n or ".modules_to_save." in n or (bias_mode != "none" and n.endswith("bias")), n
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: with B initialised to zero, A gets its first gradient on step two
        opt.zero_grad()
        loss_of(model, case, case.inputs()).backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if n in trainable:
            assert changed, f"trainable {n} did not change"
        else:
            assert not changed, f"frozen {n} changed"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_merged_equals_unmerged_equals_unloaded(case: Case):
    model = build(peftkit, case)
    inputs = case.inputs()
    if is_prompt_learning(case):  # nothing to merge: a clear error, and unload gives the untouched base
        for merge in (model.merge_adapter, copy.deepcopy(model).merge_and_unload):
            with pytest.raises(ValueError, match="no weights to merge"):
                merge()
        assert torch.equal(run(copy.deepcopy(model).unload(), inputs), run(case.model(0), inputs))
        return
    unmerged = run(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=ATOL, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=ATOL, rtol=1e-5)
    plain = copy.deepcopy(model).merge_and_unload()
    prefix = peftkit.registry.get_method(case.peft_type).prefix
    assert not any(prefix in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(run(plain, inputs), unmerged, atol=ATOL, rtol=1e-5)
    base = copy.deepcopy(model).unload()
    assert torch.equal(run(base, inputs), run_disabled(model, inputs))


def run_disabled(model, inputs):
    with model.disable_adapter():
        return run(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_disable_gives_base_output(case: Case):
    model = build(peftkit, case)
    inputs = case.inputs()
    base_out = run(case.model(0), inputs)
    with_adapter = run(model, inputs)
    if case.changes_base:  # PiSSA/OLoRA: base residual + adapter == the original model at init
        torch.testing.assert_close(with_adapter, base_out, atol=1e-4, rtol=1e-4)
        return
    if case.identity_init:
        assert torch.equal(with_adapter, base_out), "a zero-initialised adapter must not change the output"
    else:
        comparable = with_adapter
        if comparable.shape != base_out.shape:  # prompt tuning prepends virtual tokens: compare the real ones
            comparable = with_adapter[:, -base_out.shape[1] :]
        assert comparable.shape == base_out.shape, (with_adapter.shape, base_out.shape)
        assert not torch.allclose(comparable, base_out, atol=1e-6), "the adapter has no effect"
    assert torch.equal(run_disabled(model, inputs), base_out)
    if is_prompt_learning(case):
        return
    model.merge_adapter()  # disabling a merged adapter unmerges it: the base returns up to rounding
    torch.testing.assert_close(run_disabled(model, inputs), base_out, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(run(model, inputs), with_adapter, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_save_load_roundtrip_is_exact(case: Case, tmp_path):
    model = build(peftkit, case)
    perturbed = perturb_trained_base_tensors(model, case)
    assert bool(perturbed) == _trains_base_tensors(case), perturbed
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    base = case.model(0)
    if case.changes_base:  # the residual base is part of what was trained; reuse it
        base = copy.deepcopy(model).unload()
    loaded = peftkit.PeftModel.from_pretrained(base, tmp_path)
    inputs = case.inputs()
    assert torch.equal(run(loaded, inputs), run(model, inputs))
    a, b = model.get_adapter_state_dict(), loaded.get_adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("direction", ["peftkit->hf", "hf->peftkit"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_interop_with_hf_peft(case: Case, direction: str, tmp_path):
    src, dst = (peftkit, hf_peft) if direction == "peftkit->hf" else (hf_peft, peftkit)
    model = build(src, case)
    inputs = case.inputs()
    if case.changes_base:  # deterministic init: both libraries must produce the same adapter and residual
        other = build(dst, case)
        mine, theirs = model.state_dict(), other.state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)
        # and the files: `dst` loads `src`'s file onto the residual base exactly as it loads its own (HF peft
        # reruns the PiSSA/OLoRA init when loading, so "as its own" is the reference, not the trained output)
        model.save_pretrained(tmp_path / "src")
        other.save_pretrained(tmp_path / "dst")
        outs = [
            run(dst.PeftModel.from_pretrained(copy.deepcopy(other).unload(), tmp_path / f), inputs)
            for f in ("src", "dst")
        ]
        torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=1e-5)
        if dst is peftkit:  # peftkit loads onto the residual as is: the trained model's output
            torch.testing.assert_close(outs[0], run(model, inputs), atol=1e-4, rtol=1e-4)
        return
    assert bool(perturb_trained_base_tensors(model, case)) == _trains_base_tensors(case)
    model.save_pretrained(tmp_path)
    try:
        loaded = dst.PeftModel.from_pretrained(case.model(0), tmp_path)
    except TypeError as e:  # the reference itself, on the oldest transformers CI tests (5.0.0)
        if dst is hf_peft and "loading_info" in str(e):
            pytest.skip(
                f"HF peft {hf_peft.__version__} cannot load target_parameters adapters on this transformers: {e}"
            )
        raise
    assert type(loaded).__name__ == type(model).__name__
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), atol=ATOL, rtol=1e-5)


def _trains_base_tensors(case: Case) -> bool:
    return case.config.get("bias", "none") != "none" or case.task_type == "SEQ_CLS"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_training_lowers_loss(case: Case):
    model = build(peftkit, case)
    model.train()
    inputs = case.inputs()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    with torch.no_grad():
        first = loss_of(model, case, inputs).item()
    for _ in range(30):
        opt.zero_grad()
        loss_of(model, case, inputs).backward()
        opt.step()
    with torch.no_grad():
        last = loss_of(model, case, inputs).item()
    assert last < 0.95 * first, (first, last)
