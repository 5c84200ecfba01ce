"""AdaLoRA: the rank budget really shrinks during training, and pruned adapters interoperate with HF peft."""

from __future__ import annotations

import copy
import dataclasses
import re

import peft as hf_peft
import pytest
import torch
from torch.overrides import TorchFunctionMode

import peftkit

from .models import tiny_gpt2, tiny_llama, token_inputs


def train_with_allocation(lib, make_model, steps=12):
    torch.manual_seed(0)
    cfg = lib.AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=steps, tinit=2, tfinal=3, lora_alpha=32
    )
    model = lib.get_peft_model(make_model(), cfg)
    model.train()
    inputs = token_inputs()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ranks = []
    for step in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        ranks.append(
            sum(
                int((m.lora_E["default"] != 0).sum())
                for m in model.modules()
                if hasattr(m, "lora_E") and "default" in m.lora_E
            )
        )
    return model.eval(), ranks


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_ranks_shrink_to_the_target_budget(make_model):
    model, ranks = train_with_allocation(peftkit, make_model)
    n_layers = len(model.peft_config["default"].rank_pattern)
    initial, target = 6 * n_layers, 2 * n_layers
    assert ranks[0] == initial  # warm-up keeps the full budget
    assert all(b <= a for a, b in zip(ranks, ranks[1:])), ranks  # never grows back
    assert initial > ranks[5] > target  # cubic decay in between
    assert ranks[-1] == target and ranks[-4] == target  # fixed at the target in the final phase


@pytest.mark.parametrize(
    "src, dst", [(peftkit, hf_peft), (hf_peft, peftkit)], ids=["peftkit->hf", "hf->peftkit"]
)
def test_pruned_adapter_interop(src, dst, tmp_path):
    model, _ = train_with_allocation(src, tiny_llama)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")) == 8  # pruned ranks not saved
    loaded = dst.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    inputs = token_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_orthogonal_penalty_is_added_to_the_loss():
    inputs = token_inputs()
    cfg = dict(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10)
    torch.manual_seed(0)
    with_pen = peftkit.get_peft_model(tiny_llama(), peftkit.AdaLoraConfig(**cfg))
    torch.manual_seed(0)
    without = peftkit.get_peft_model(tiny_llama(), peftkit.AdaLoraConfig(orth_reg_weight=0.0, **cfg))
    a = with_pen(**inputs, labels=inputs["input_ids"]).loss
    b = without(**inputs, labels=inputs["input_ids"]).loss
    assert a.item() > b.item() + 0.1  # A A^T and B^T B start far from I with std-0.02 init


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "total_step must be a positive"),
        ({"total_step": 10, "tinit": 8, "tfinal": 2}, "tinit (8) must be < total_step - tfinal (8)"),
        ({"total_step": 10, "use_dora": True}, "does not support DoRA"),
        ({"total_step": 10, "beta1": 1.0}, "beta1 must be in (0, 1)"),
    ],
)
def test_config_validation(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        peftkit.AdaLoraConfig(**kwargs)
    assert fragment in str(err.value)


class IndexOnTensorsDevice(TorchFunctionMode):
    """Fails an index_select whose index is not on the indexed tensor's device (on CUDA that raises)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.index_select, torch.index_select):
            tensor, index = args[0], args[2] if len(args) > 2 else kwargs["index"]
            assert index.device == tensor.device, f"index on {index.device} for a tensor on {tensor.device}"
        return func(*args, **kwargs)


def pruned_model_on_meta():
    """An AdaLoRA model (init_r 4) whose allocation keeps ranks 0 and 2 of every layer, moved to `meta`."""
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        tiny_llama(), peftkit.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10)
    )
    paths = model.base_model._svd_layers("default")
    pattern = {f"{p}.lora_E": [True, False, True, False] for p in paths}
    config = model.base_model.peft_config["default"]
    model.base_model.peft_config["default"] = dataclasses.replace(config, rank_pattern=pattern)
    return model.to("meta"), paths


def test_saving_a_pruned_adapter_indexes_on_the_tensors_device():
    model, paths = pruned_model_on_meta()
    with IndexOnTensorsDevice():
        tensors = model.get_adapter_state_dict()
    for path in paths:
        A, E, B = (tensors[f"base_model.model.{path}.{attr}"] for attr in ("lora_A", "lora_E", "lora_B"))
        assert A.shape[0] == E.shape[0] == B.shape[1] == 2 and {A.device, E.device, B.device} == {A.device}
        assert A.device.type == "meta"


def test_loading_a_pruned_adapter_shrinks_on_the_tensors_device():
    model, paths = pruned_model_on_meta()
    with IndexOnTensorsDevice():
        model.base_model.before_loading("default")
    for layer in paths.values():
        assert layer.lora_A["default"].shape[0] == layer.lora_E["default"].shape[0] == 2
        assert layer.lora_B["default"].shape[1] == 2 and layer.lora_B["default"].device.type == "meta"


def test_training_state_resumes_allocation_exactly(tmp_path):
    """Stop mid-budget, save adapter + optimizer + allocator, load into a fresh model: the rest of the run is
    bit for bit the uninterrupted one (ranks, scores, masked-but-trained triplets, optimizer moments)."""
    steps, cut, inputs = 10, 4, token_inputs()
    cfg = dict(
        task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=steps, tinit=1, tfinal=3, lora_dropout=0.1
    )

    def make_optimizer(model):
        return torch.optim.AdamW([p for _, p in sorted(model.named_parameters()) if p.requires_grad], lr=1e-2)

    def run(model, opt, start, stop):
        for step in range(start, stop):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()

    torch.manual_seed(0)
    full = peftkit.get_peft_model(tiny_llama(), peftkit.AdaLoraConfig(**cfg)).train()
    opt = make_optimizer(full)
    run(full, opt, 0, cut)
    assert full.peft_config["default"].rank_pattern  # the budget already shrank: the saved file is pruned
    full.save_pretrained(tmp_path)
    state, opt_state = full.base_model.training_state(), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    run(full, opt, cut, steps)

    resumed = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
    resumed.base_model.load_training_state(state)
    opt = make_optimizer(resumed)
    opt.load_state_dict(opt_state)
    torch.set_rng_state(rng)
    run(resumed, opt, cut, steps)

    assert resumed.peft_config["default"].rank_pattern == full.peft_config["default"].rank_pattern
    want, got = full.state_dict(), resumed.state_dict()
    adapter_keys = [k for k in want if "lora_" in k]
    assert adapter_keys and all(torch.equal(got[k], want[k]) for k in adapter_keys)


def test_training_state_for_other_modules_is_refused():
    torch.manual_seed(0)
    cfg = peftkit.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10)
    state = peftkit.get_peft_model(tiny_llama(), cfg).base_model.training_state()
    narrow = dataclasses.replace(cfg, target_modules=["q_proj"])
    other = peftkit.get_peft_model(tiny_llama(), narrow)
    fragment = (
        "AdaLoRA training state of adapter 'default' does not fit this model: modules only in the state"
    )
    with pytest.raises(ValueError, match=re.escape(fragment)):
        other.base_model.load_training_state(state)


def test_default_targets_are_adaloras_own_as_in_hf_peft():
    """AdaLoRA with no target_modules on OPT adapts every attention projection and the MLP (HF peft's table),
    not LoRA's q/v; the same modules as HF peft's AdaLoRA."""
    import peft as hf
    from transformers import OPTConfig, OPTForCausalLM

    import peftkit

    def opt():
        torch.manual_seed(0)
        return OPTForCausalLM(
            OPTConfig(
                vocab_size=64,
                hidden_size=16,
                ffn_dim=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                word_embed_proj_dim=16,
            )
        )

    config = dict(init_r=4, target_r=2, total_step=10)
    ours = peftkit.get_peft_model(opt(), peftkit.AdaLoraConfig(**config))
    theirs = hf.get_peft_model(opt(), hf.AdaLoraConfig(**config))
    assert set(ours.peft_config["default"].target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    }
    assert sorted(n for n, _ in ours.named_parameters() if "lora_A" in n) == sorted(
        n for n, _ in theirs.named_parameters() if "lora_A" in n
    )
