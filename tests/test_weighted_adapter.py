"""`add_weighted_adapter`: every combination type against HF peft on the same adapters, plus exactness of the
exact types (cat, full-rank svd) against the weighted sum of the dense updates, DARE reproducibility and the
errors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.functional import combine as C

from .models import image_inputs, output_tensor, tiny_convnet, tiny_gpt2, tiny_llama, token_inputs

hf_peft = pytest.importorskip("peft")

ADAPTERS = ["a", "b"]
WEIGHTS = [0.7, -0.4]


def _two_adapters(lib, factory, tmp_path, configs):
    """A model of `lib` holding adapters a and b, with the tensors peftkit created (saved, then loaded)."""
    if lib is peftkit:
        model = peftkit.get_peft_model(factory(), configs[0], adapter_name="a")
        model.add_adapter("b", configs[1])
        model.save_pretrained(tmp_path)
        return model
    model = hf_peft.PeftModel.from_pretrained(factory(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    return model


def _lora(lib, **kw):
    return lib.LoraConfig(init_lora_weights=False, **kw)


def _pair(factory, tmp_path, kw_a, kw_b):
    ours = _two_adapters(peftkit, factory, tmp_path, [_lora(peftkit, **kw_a), _lora(peftkit, **kw_b)])
    theirs = _two_adapters(hf_peft, factory, tmp_path, None)
    return ours, theirs


def _combined_output(model, inputs, seed=0, **kwargs):
    torch.manual_seed(seed)
    model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix", **kwargs)
    model.set_adapter("mix")
    with torch.no_grad():
        return output_tensor(model(**inputs))


LLAMA_TARGETS = {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}
TYPES = [
    ("svd", {}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("svd", {"svd_full_matrices": False}),
    ("linear", {}),
    ("cat", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.6}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4}),
    # DARE at density 1 keeps everything; its random masks are compared with the reference's math below
    # (model-level draws differ: HF peft also draws random numbers to initialise the new adapter first)
    ("dare_linear", {"density": 1.0}),
    ("dare_ties_svd", {"density": 1.0, "majority_sign_method": "frequency"}),
]


@pytest.mark.parametrize("combination_type,kwargs", TYPES, ids=lambda v: str(v))
def test_every_type_gives_the_reference_logits_on_llama(tmp_path, combination_type, kwargs):
    """Same adapters, same call (DARE: same global seed) -> the same logits as HF peft (fp32)."""
    same_rank = {"r": 4, "lora_alpha": 8, **LLAMA_TARGETS}
    ours, theirs = _pair(tiny_llama, tmp_path, same_rank, {**same_rank, "lora_alpha": 4})
    inputs = token_inputs()
    got = _combined_output(ours, inputs, combination_type=combination_type, **kwargs)
    want = _combined_output(theirs, inputs, combination_type=combination_type, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        ours.set_adapter("a")
        assert not torch.allclose(got, output_tensor(ours(**inputs)), atol=1e-3)


@pytest.mark.parametrize("combination_type", ["svd", "cat", "ties_svd"])
def test_different_ranks_and_gpt2_conv1d(tmp_path, combination_type):
    """Conv1D layers (fan_in_fan_out) and adapters of different rank and targets, against HF peft."""
    ours, theirs = _pair(
        tiny_gpt2,
        tmp_path,
        {"r": 4, "target_modules": ["c_attn"]},
        {"r": 2, "target_modules": ["c_attn", "c_fc"], "lora_alpha": 16},
    )
    inputs, kw = token_inputs(), {"density": 0.5} if combination_type == "ties_svd" else {}
    got = _combined_output(ours, inputs, combination_type=combination_type, **kw)
    want = _combined_output(theirs, inputs, combination_type=combination_type, **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    expected_rank = 6 if combination_type == "cat" else 4
    assert ours.peft_config["mix"].r == expected_rank == theirs.peft_config["mix"].r
    assert set(ours.peft_config["mix"].target_modules) == {"c_attn", "c_fc"}


def _delta_sum(model, layer_filter=lambda name: True):
    """{module: sum_i w_i * delta_i} and {module: delta_mix} over the adapter layers."""
    want, got = {}, {}
    for name, layer in model.base_model.adapter_layers():
        if "mix" in layer.adapter_names and layer_filter(name):
            present = [(a, w) for a, w in zip(ADAPTERS, WEIGHTS) if a in layer.adapter_names]
            want[name] = sum(w * layer.delta_weight(a) for a, w in present)
            got[name] = layer.delta_weight("mix")
    return want, got


@pytest.mark.parametrize("factory", [tiny_llama, tiny_convnet], ids=["llama", "conv2d"])
def test_cat_and_full_rank_svd_are_exact(factory, tmp_path):
    """cat is exact by construction; svd with rank >= the combined rank is exact up to rounding."""
    targets = {"target_modules": ["conv1", "conv2", "head"]} if factory is tiny_convnet else LLAMA_TARGETS
    for kind, extra in [("cat", {}), ("svd", {"svd_rank": 8})]:
        model = peftkit.get_peft_model(factory(), _lora(peftkit, r=4, **targets), adapter_name="a")
        model.add_adapter("b", _lora(peftkit, r=4, lora_alpha=3, **targets))
        model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix", combination_type=kind, **extra)
        want, got = _delta_sum(model)
        assert want
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("combination_type", ["svd", "cat", "linear"])
def test_conv2d_matches_reference(tmp_path, combination_type):
    conv = {"r": 2, "target_modules": ["conv1", "conv2"]}
    ours, theirs = _pair(tiny_convnet, tmp_path, conv, {**conv, "lora_alpha": 5})
    inputs = image_inputs()
    got = _combined_output(ours, inputs, combination_type=combination_type)
    want = _combined_output(theirs, inputs, combination_type=combination_type)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_schemes_equal_the_reference_math_with_the_same_seed(scheme, sign):
    from peft.utils import merge_utils as ref

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = torch.tensor([0.5, -1.5, 2.0])
    args = {} if scheme == "linear" else {"density": 0.4}
    if scheme.endswith("ties"):
        args["majority_sign_method"] = sign
    torch.manual_seed(11)
    got = C.combine(scheme, tensors, weights.tolist(), **args)
    torch.manual_seed(11)
    want = getattr(ref, "task_arithmetic" if scheme == "linear" else scheme)(tensors, weights, **args)
    torch.testing.assert_close(got, want)


def test_dare_is_reproducible_with_a_generator_and_varies_with_the_seed():
    def mix(seed):
        model = peftkit.get_peft_model(tiny_llama(), _lora(peftkit, r=4), adapter_name="a")
        model.add_adapter("b", _lora(peftkit, r=4))
        gen = torch.Generator().manual_seed(seed)
        model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix", "dare_ties", density=0.5, generator=gen)
        return model.get_adapter_state_dict("mix")

    first, again, other = mix(1), mix(1), mix(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_new_adapter_is_inactive_frozen_saved_and_loads_in_hf(tmp_path):
    model = peftkit.get_peft_model(tiny_llama(), _lora(peftkit, r=4, lora_dropout=0.0), adapter_name="a")
    model.add_adapter("b", _lora(peftkit, r=4))
    model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix", combination_type="svd")
    assert model.active_adapter == "a"
    mix_params = [n for n, p in model.named_parameters() if ".mix." in n]
    assert mix_params and not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 4, False)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    model.set_adapter("mix")
    inputs = token_inputs()
    with torch.no_grad():
        ours = output_tensor(model(**inputs))
        theirs = output_tensor(hf_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix")(**inputs))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_rslora_adapters_combine_to_the_weighted_sum():
    """The combination carries the scalings, so the new adapter has scaling 1 even when inputs use rsLoRA
    (HF peft keeps use_rslora on the new adapter, which scales it by sqrt(r))."""
    model = peftkit.get_peft_model(tiny_llama(), _lora(peftkit, r=4, use_rslora=True), adapter_name="a")
    model.add_adapter("b", _lora(peftkit, r=4, use_rslora=True))
    model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix", combination_type="cat")
    want, got = _delta_sum(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_ia3_weighted_sum_matches_reference(tmp_path):
    def cfg(lib):
        return lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])

    ours = peftkit.get_peft_model(tiny_llama(), cfg(peftkit), adapter_name="a")
    ours.add_adapter("b", cfg(peftkit))
    with torch.no_grad():
        for i, (n, p) in enumerate(ours.named_parameters()):
            if "ia3_l" in n:
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    theirs = _two_adapters(hf_peft, tiny_llama, tmp_path, None)
    inputs = token_inputs()
    got = _combined_output(ours, inputs)
    want = _combined_output(theirs, inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: m.add_weighted_adapter(["a", "zz"], [1, 1], "mix"), "zz"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1], "mix"), "2 adapters but 1 weights"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "a"), "already exists"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "mix", "nope"), "combination_type"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "mix", "linear"), "equal ranks"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "mix", "ties_svd"), "pass density"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "mix", "ties", density=0.5), "equal ranks"),
    ],
)
def test_errors_name_the_problem(call, message):
    model = peftkit.get_peft_model(tiny_llama(), _lora(peftkit, r=4), adapter_name="a")
    model.add_adapter("b", _lora(peftkit, r=2))
    with pytest.raises(ValueError, match=message):
        call(model)
    assert "mix" not in model.peft_config or message == "pass density"


def test_dora_and_other_methods_are_refused():
    model = peftkit.get_peft_model(tiny_llama(), _lora(peftkit, r=4, use_dora=True), adapter_name="a")
    model.add_adapter("b", _lora(peftkit, r=4, use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix")
    loha = peftkit.get_peft_model(
        tiny_llama(), peftkit.LoHaConfig(target_modules=["q_proj"]), adapter_name="a"
    )
    with pytest.raises(ValueError, match="LoRA or IA3"):
        loha.add_weighted_adapter(["a"], [1.0], "mix")


def test_ties_math_by_hand():
    a = torch.tensor([3.0, -1.0, 0.5, -4.0])
    b = torch.tensor([-2.0, -3.0, 1.0, 1.0])
    # density 0.5 keeps the 2 largest |.| of each: a -> [3, 0, 0, -4], b -> [-2, -3, 0, 0]
    # elected signs (total): [1-> 3-2=1 >=0: +], [-3: -], [0: +], [-4: -]
    got = C.combine("ties", [a, b], [1.0, 2.0], density=0.5)
    want = torch.tensor([3.0, -6.0, 0.0, -4.0])
    torch.testing.assert_close(got, want)


def test_second_all_linear_adapter_targets_the_same_layers():
    """all-linear on a model that already has LoRA layers means the original Linears, not lora_A/lora_B."""
    model = peftkit.get_peft_model(tiny_llama(), _lora(peftkit, r=4, target_modules="all-linear"), "a")
    model.add_adapter("b", _lora(peftkit, r=2, target_modules="all-linear"))
    assert set(model.peft_config["b"].target_modules) == set(model.peft_config["a"].target_modules)
    assert set(model.peft_config["a"].target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
