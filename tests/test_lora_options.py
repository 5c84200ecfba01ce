"""LoRA options beyond the conformance battery's cases: bad values give errors that name the fault, and the
behaviours the battery does not see (merging a bias, ...), side by side with HF peft where it has them."""

from __future__ import annotations

import peft as hf_peft
import pytest
import torch

import peftkit

from .models import image_inputs, tiny_convnet, tiny_gpt2, tiny_llama, token_inputs


def logits(model, inputs=None):
    with torch.no_grad():
        out = model(**(inputs or token_inputs()))
    return out if isinstance(out, torch.Tensor) else out.logits


# ----- lora_bias -----
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_dora": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "lora_bias"),
    ],
)
def test_lora_bias_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        peftkit.LoraConfig(lora_bias=True, **kwargs)


def test_lora_bias_on_embedding_is_refused():
    config = peftkit.LoraConfig(target_modules=["embed_tokens"], lora_bias=True)
    with pytest.raises(ValueError, match="embed_tokens.*lora_bias"):
        peftkit.get_peft_model(tiny_llama(), config)


def test_lora_bias_without_base_bias_warns_and_cannot_merge():
    config = peftkit.LoraConfig(target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    with pytest.warns(UserWarning, match="q_proj.*no bias"):
        model = peftkit.get_peft_model(tiny_llama(), config)
    before = logits(model)
    with pytest.raises(ValueError, match="q_proj.*lora_bias"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model), before)  # all-or-nothing: nothing stayed merged


def test_lora_bias_matches_hf_after_training_the_bias(tmp_path):
    """B's bias is scaled like the rest of the branch (HF: `B(A(x)) * scaling`)."""
    config = {"r": 4, "lora_alpha": 16, "lora_bias": True, "target_modules": ["c_attn"]}
    ours = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(**config))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ours.save_pretrained(tmp_path)
    theirs = hf_peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(theirs), atol=1e-5, rtol=1e-5)


def test_lora_bias_conv2d_merge_moves_the_bias():
    config = peftkit.LoraConfig(target_modules=["conv1"], lora_bias=True, init_lora_weights=False)
    model = peftkit.get_peft_model(tiny_convnet(), config)
    base_bias = model.base_model.model.conv1.base_layer.bias.detach().clone()
    out = logits(model, image_inputs())
    model.merge_adapter()
    assert not torch.equal(model.base_model.model.conv1.base_layer.bias, base_bias)
    torch.testing.assert_close(logits(model, image_inputs()), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.conv1.base_layer.bias, base_bias)


# ----- trainable_token_indices (LoRA) and TrainableTokensConfig -----
def _perturb(model, scale=0.5):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "factory, spec",
    [(tiny_llama, [1, 5, 7, 9]), (tiny_gpt2, {"wte": [1, 5, 7, 9]})],
    ids=["llama-list", "gpt2-tied-dict"],
)
@pytest.mark.parametrize("direction", ["peftkit->hf", "hf->peftkit"])
def test_lora_trainable_token_indices_interop(factory, spec, direction, tmp_path):
    src, dst = (peftkit, hf_peft) if direction == "peftkit->hf" else (hf_peft, peftkit)
    config = {"r": 2, "init_lora_weights": False, "trainable_token_indices": spec}
    torch.manual_seed(0)
    model = src.get_peft_model(factory(), src.LoraConfig(**config))
    _perturb(model)
    other = dst.get_peft_model(factory(), dst.LoraConfig(**config))
    assert set(model.state_dict()) == set(other.state_dict())
    inputs = token_inputs(seed=2)
    inputs["input_ids"][0, :4] = torch.tensor([1, 5, 7, 9])  # the trained ids occur
    model.save_pretrained(tmp_path)
    loaded = dst.PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=1e-5)


def test_lora_trainable_tokens_train_merge_unload():
    config = peftkit.LoraConfig(r=2, init_lora_weights=False, trainable_token_indices={"wte": [3, 4]})
    model = peftkit.get_peft_model(tiny_gpt2(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta.default" in trainable
    _perturb(model)
    inputs = token_inputs()
    inputs["input_ids"][:, 0] = 3
    out = logits(model, inputs)
    with model.disable_adapter():
        base = logits(model, inputs)
    assert not torch.allclose(out, base)
    plain = model.merge_and_unload()
    assert type(plain.transformer.wte) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    assert plain.lm_head.weight is plain.transformer.wte.weight  # still tied
    torch.testing.assert_close(logits(plain, inputs), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "spec, match",
    [
        ([], "non-empty"),
        ([1, 1], "twice"),
        ([-1], "non-negative"),
        ({"embed_tokens": "abc"}, "embed_tokens"),
    ],
)
def test_trainable_token_indices_bad_values(spec, match):
    with pytest.raises(ValueError, match=match):
        peftkit.LoraConfig(trainable_token_indices=spec)


def test_trainable_tokens_errors_name_the_fault():
    with pytest.raises(ValueError, match="out of range.*embed_tokens"):
        peftkit.get_peft_model(tiny_llama(), peftkit.TrainableTokensConfig(token_indices=[1, 10_000]))
    with pytest.raises(ValueError, match="'nope'.*embeddings"):
        peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(trainable_token_indices={"nope": [1]}))
    with pytest.raises(ValueError, match="token_indices"):
        peftkit.TrainableTokensConfig(token_indices=[])


def test_trainable_tokens_config_file_matches_hf(tmp_path):
    model = peftkit.get_peft_model(tiny_llama(), peftkit.TrainableTokensConfig(token_indices=[2, 3]))
    model.save_pretrained(tmp_path)
    theirs = hf_peft.PeftConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "TrainableTokensConfig" and theirs.token_indices == [2, 3]
    assert theirs.target_modules == "model.embed_tokens"


# ----- layer_replication (not a conformance case: the battery merges, which a replicated model refuses) -----
_REPL = {"r": 2, "init_lora_weights": False, "layer_replication": [[0, 2], [1, 2]]}


@pytest.mark.parametrize("direction", ["peftkit->hf", "hf->peftkit"])
def test_layer_replication_interop(direction, tmp_path):
    src, dst = (peftkit, hf_peft) if direction == "peftkit->hf" else (hf_peft, peftkit)
    torch.manual_seed(0)
    model = src.get_peft_model(tiny_llama(), src.LoraConfig(**_REPL))
    other = dst.get_peft_model(tiny_llama(), dst.LoraConfig(**_REPL))
    assert set(model.state_dict()) == set(other.state_dict())
    model.save_pretrained(tmp_path)
    loaded = dst.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert len(loaded.get_base_model().model.layers) == 3
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


def test_layer_replication_shares_base_weights_and_generates():
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(**_REPL))
    layers = model.get_base_model().model.layers
    assert layers[2].mlp.down_proj.weight is layers[1].mlp.down_proj.weight
    assert layers[2].self_attn.q_proj.lora_A["default"] is not layers[1].self_attn.q_proj.lora_A["default"]
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2]
    assert model.get_base_model().config.num_hidden_layers == 3
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_layer_replication_refuses_merge_and_bad_values():
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(**_REPL))
    with pytest.raises(ValueError, match="layer_replication"):
        model.merge_and_unload()
    for bad in ([[2, 1]], [[0]], [], [["a", 1]]):
        with pytest.raises(ValueError, match="layer_replication"):
            peftkit.LoraConfig(layer_replication=bad)
    with pytest.raises(ValueError, match=r"\[0, 5\).*2 blocks"):
        peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(layer_replication=[[0, 5]]))
    with pytest.raises(ValueError, match="differs"):
        model.add_adapter("other", peftkit.LoraConfig(layer_replication=[[0, 1]]))


# ----- target_parameters (beyond the conformance cases) -----
@pytest.mark.parametrize("order", [["gate_up_proj", "down_proj"], ["down_proj", "gate_up_proj"]])
def test_target_parameters_nesting_order_matches_hf(order):
    from .moe_models import tiny_mixtral

    config = {"r": 2, "target_parameters": [f"experts.{n}" for n in order]}
    ours = peftkit.get_peft_model(tiny_mixtral(), peftkit.LoraConfig(**config))
    theirs = hf_peft.get_peft_model(tiny_mixtral(), hf_peft.LoraConfig(**config))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert ours.peft_config["default"].target_modules == set()


def test_target_parameters_errors():
    from .moe_models import tiny_mixtral

    with pytest.raises(ValueError, match="match no parameter"):
        peftkit.get_peft_model(tiny_mixtral(), peftkit.LoraConfig(target_parameters=["experts.nope"]))
    with pytest.raises(ValueError, match="lora_dropout"):
        peftkit.get_peft_model(
            tiny_mixtral(), peftkit.LoraConfig(target_parameters=["experts.down_proj"], lora_dropout=0.1)
        )
    with pytest.raises(ValueError, match="target_parameters"):
        peftkit.LoraConfig(target_parameters="experts.down_proj")
    with pytest.raises(ValueError, match="shape"):
        peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(target_parameters=["input_layernorm.weight"]))
