"""AdaLoRA: the rank budget really shrinks during training, and pruned adapters interoperate with HF peft."""

from __future__ import annotations

import peft as hf_peft
import pytest
import torch

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
