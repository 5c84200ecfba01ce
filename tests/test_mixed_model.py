"""PeftMixedModel: adapters of different methods active together, side by side with HF peft's mixed model
(same state-dict keys, same logits after copying the tensors, files read and written both ways)."""

from __future__ import annotations

import pytest
import torch

import peftkit as pk

from . import models as M

peft = pytest.importorskip("peft")

# (adapter name, config class name, kwargs): random inits so every adapter changes the output
MIXES = {
    "lora-loha-oft": [
        ("a1", "LoraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}),
        ("a2", "LoHaConfig", {"r": 4, "target_modules": ["q_proj", "k_proj"], "init_weights": False}),
        (
            "a3",
            "OFTConfig",
            {"r": 0, "oft_block_size": 4, "target_modules": ["q_proj"], "init_weights": False},
        ),
    ],
    "lokr-lora-lora": [
        ("kron", "LoKrConfig", {"r": 2, "target_modules": ["q_proj", "o_proj"], "init_weights": False}),
        ("l1", "LoraConfig", {"r": 2, "target_modules": ["q_proj"], "init_lora_weights": False}),
        ("l2", "LoraConfig", {"r": 3, "target_modules": ["o_proj", "q_proj"], "init_lora_weights": False}),
    ],
    "oft-adalora-loha": [
        (
            "rot",
            "OFTConfig",
            {"r": 0, "oft_block_size": 8, "target_modules": ["v_proj"], "init_weights": False},
        ),
        ("ada", "AdaLoraConfig", {"init_r": 4, "target_modules": ["v_proj", "q_proj"], "total_step": 10}),
        ("hp", "LoHaConfig", {"r": 2, "target_modules": ["v_proj"], "init_weights": False}),
    ],
}


def build(lib, mix: str, active: list[str] | None = None):
    torch.manual_seed(0)
    specs = MIXES[mix]
    (first, cls, kw), rest = specs[0], specs[1:]
    model = lib.get_peft_model(M.tiny_llama(), getattr(lib, cls)(**kw), adapter_name=first, mixed=True)
    for name, cls, kw in rest:
        model.add_adapter(name, getattr(lib, cls)(**kw))
    model.set_adapter(active or [s[0] for s in specs])
    return model


def randomise(model) -> None:
    """Non-zero values in every adapter tensor (AdaLoRA starts with E = 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_(0, 0.5)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("mix", list(MIXES))
def test_same_layout_and_logits_as_hf_peft(mix) -> None:
    hf, ours = build(peft, mix), build(pk, mix)
    assert isinstance(ours, pk.PeftMixedModel)
    randomise(hf)
    hf_state = hf.state_dict()
    assert set(ours.state_dict()) == set(hf_state)  # nested `base_layer.` levels included
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in hf.named_parameters() if p.requires_grad}
    ours.load_state_dict(hf_state)
    inputs = M.token_inputs()
    expected = logits(hf, inputs)
    assert not torch.allclose(expected, logits(M.tiny_llama(), inputs), atol=1e-3)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=0, atol=1e-5)
    # a subset of the adapters
    names = [s[0] for s in MIXES[mix]]
    for model in (hf, ours):
        model.set_adapter(names[1:])
    torch.testing.assert_close(logits(ours, inputs), logits(hf, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mix", ["lora-loha-oft", "lokr-lora-lora"])
def test_files_both_ways_with_hf_peft(mix, tmp_path) -> None:
    """Our mixed model saves one-method adapter folders that HF peft's PeftMixedModel loads, and loads the folders
    HF peft's one-method PeftModels write; all four give the same logits."""
    ours = build(pk, mix)
    ours.save_pretrained(tmp_path / "ours")
    specs = MIXES[mix]
    names = [s[0] for s in specs]
    inputs = M.token_inputs()
    expected = logits(ours, inputs)

    def load(lib, root):
        model = lib.PeftMixedModel.from_pretrained(M.tiny_llama(), str(root / names[0]), names[0])
        for name in names[1:]:
            model.load_adapter(str(root / name), name)
        model.set_adapter(names)
        return model

    # every adapter name is non-default, so each sits in its own sub-folder
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(names)
    hf = load(peft, tmp_path / "ours")
    torch.testing.assert_close(logits(hf, inputs), expected, rtol=0, atol=1e-5)
    # HF peft writes each adapter from a one-method model over the same (mixed) tensors
    for name, cls, kw in specs:
        single = peft.get_peft_model(M.tiny_llama(), getattr(peft, cls)(**kw), adapter_name=name)
        state = hf.base_model.model.state_dict()
        for key, value in single.state_dict().items():
            if f".{name}" in key:
                nested = _find_nested(state, key.removeprefix("base_model.model."))
                value.data.copy_(nested)
        single.save_pretrained(tmp_path / "hf", selected_adapters=[name])
    loaded = load(pk, tmp_path / "hf")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-5)


def _find_nested(state: dict, key: str) -> torch.Tensor:
    """The tensor of a one-method key in a mixed model's state dict (where `base_layer.` levels may sit
    before the adapter container)."""
    candidates = [k for k in state if k.replace("base_layer.", "") == key.replace("base_layer.", "")]
    assert len(candidates) == 1, (key, candidates)
    return state[candidates[0]]


def test_disable_merge_unload_delete() -> None:
    inputs = M.token_inputs()
    base = logits(M.tiny_llama(), inputs)
    ours, hf = build(pk, "lora-loha-oft"), build(peft, "lora-loha-oft")
    ours.load_state_dict(hf.state_dict())
    unmerged = logits(ours, inputs)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, inputs), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(ours, inputs), unmerged, rtol=0, atol=0)
    # deleting the outer OFT adapter leaves its (empty) layer, as HF peft does; the others keep working
    ours.delete_adapter("a3")
    hf.delete_adapter("a3")
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert set(ours.active_adapters) == set(hf.active_adapters) == {"a1", "a2"}
    torch.testing.assert_close(logits(ours, inputs), logits(hf, inputs), rtol=0, atol=1e-5)
    # merging folds the inner layer first (the order an outer OFT's forward sees): merged == unmerged
    ours2, hf2 = build(pk, "lora-loha-oft"), build(peft, "lora-loha-oft")
    ours2.load_state_dict(hf2.state_dict())
    merged = ours2.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, inputs), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        logits(merged, inputs), logits(hf2.merge_and_unload(), inputs), rtol=0, atol=1e-5
    )
    plain = build(pk, "lora-loha-oft").unload()
    torch.testing.assert_close(logits(plain, inputs), base, rtol=0, atol=0)
    assert not any("base_layer" in k for k in plain.state_dict())


def test_training_two_methods_together() -> None:
    """Both active adapters train (and only they): the loss falls and each adapter's tensors move."""
    model = build(pk, "lora-loha-oft", active=["a1", "a2"])
    inputs = M.token_inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".a1" in n for n in before) and any(".a2" in n for n in before)
    assert not any(".a3" in n for n in before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == set(before)


def test_errors_name_the_problem(tmp_path) -> None:
    model = build(pk, "lora-loha-oft")
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['nope'\] not found"):
        model.set_adapter(["a1", "nope"])
    with pytest.raises(ValueError, match="VERA adapter cannot be mixed"):
        model.add_adapter("v", pk.VeraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="modules_to_save=...\\) is not supported in a PeftMixedModel"):
        model.add_adapter("m", pk.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("a1", pk.LoraConfig(target_modules=["q_proj"]))
    assert set(model.peft_config) == {"a1", "a2", "a3"}
    # a one-method adapter of an unmixable type is refused on load, naming it
    ia3 = pk.get_peft_model(M.tiny_llama(), pk.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="IA3 adapter cannot be mixed"):
        model.load_adapter(str(tmp_path / "ia3"), "x")
