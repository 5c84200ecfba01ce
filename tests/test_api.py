"""The public API beyond the core LoRA flow (issue 16), side by side with HF peft on the same tiny models:
mappings and `get_peft_config`, config loading for every method, the low-level API (`inject_adapter_in_model`,
adapter and base state dicts, `load_peft_weights`), status and switches, errors, and the import paths
integrations use. Numbers must be equal, not merely computed."""

from __future__ import annotations

import dataclasses
import warnings

import peft as hf
import pytest
import torch

import peftkit as pk

from .models import output_tensor, tiny_bert_cls, tiny_convnet, tiny_llama, token_inputs

ATOL = 1e-6
# Arguments each method's config needs beyond its defaults (the same for both libraries).
CONFIG_ARGS: dict[str, dict] = {
    "LORA": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "ADALORA": {"total_step": 10, "target_modules": ["q_proj"]},
    "IA3": {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "LOHA": {"r": 2, "target_modules": ["q_proj"]},
    "LOKR": {"r": 2, "target_modules": ["q_proj"]},
    "VERA": {"r": 4, "target_modules": ["q_proj"]},
    "OFT": {"r": 4, "oft_block_size": 0, "target_modules": ["q_proj"]},
    "BOFT": {"boft_block_size": 4, "target_modules": ["q_proj"]},
    "LN_TUNING": {"target_modules": ["input_layernorm"]},
    "PROMPT_TUNING": {"num_virtual_tokens": 3, "task_type": "CAUSAL_LM"},
    "PREFIX_TUNING": {"num_virtual_tokens": 3, "task_type": "CAUSAL_LM"},
    "P_TUNING": {"num_virtual_tokens": 3, "encoder_hidden_size": 8, "task_type": "CAUSAL_LM"},
}


def both(name: str):
    return getattr(hf, name), getattr(pk, name)


# ----- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", [hf, pk], ids=["peft", "peftkit"])
def test_no_matching_target_is_a_catchable_peft_error(lib) -> None:
    with pytest.raises(lib.NoMatchingPeftModuleError) as info:
        lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["nope"]))
    assert isinstance(info.value, lib.PeftError) and isinstance(info.value, ValueError)
    if lib is pk:
        assert "q_proj" in str(info.value)  # still names what the model does contain
    assert issubclass(lib.PeftWarning, UserWarning)


# ----- mappings, get_peft_config, PeftConfig.from_pretrained -------------------------------------------------------
def test_type_mappings_name_the_same_classes() -> None:
    ours = {str(getattr(k, "value", k)): v.__name__ for k, v in pk.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    ref = {str(getattr(k, "value", k)): v.__name__ for k, v in hf.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    assert ours == {k: ref[k] for k in ours}
    assert pk.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is pk.LoraConfig
    assert pk.PEFT_TYPE_TO_CONFIG_MAPPING[pk.PeftType.LORA] is pk.LoraConfig
    tuners = {str(getattr(k, "value", k)): v.__name__ for k, v in pk.PEFT_TYPE_TO_TUNER_MAPPING.items()}
    ref_tuners = {str(getattr(k, "value", k)): v.__name__ for k, v in hf.PEFT_TYPE_TO_TUNER_MAPPING.items()}
    assert {k: v for k, v in tuners.items() if k in ref_tuners and v.endswith("Model")} == {
        k: ref_tuners[k] for k, v in tuners.items() if k in ref_tuners and v.endswith("Model")
    }
    assert {k: v.__name__ for k, v in pk.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()} == {
        k: v.__name__ for k, v in hf.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()
    }


TABLES = [
    "LORA",
    "LOHA",
    "LOKR",
    "VERA",
    "OFT",
    "BOFT",
    "IA3",
    "LNTUNING",
    "ADALORA",
]


@pytest.mark.parametrize("method", TABLES)
def test_default_target_tables_agree_where_both_know_the_architecture(method: str) -> None:
    name = f"TRANSFORMERS_MODELS_TO_{method}_TARGET_MODULES_MAPPING"
    ours, ref = getattr(pk.utils, name), getattr(hf.utils, name)
    shared = set(ours) & set(ref)
    assert len(shared) >= 15
    assert {k: sorted(ours[k]) for k in shared} == {k: sorted(ref[k]) for k in shared}


def _norm(value):
    """Sets and lists of names compare as sorted lists (HF peft stores target_modules as a set)."""
    is_names = isinstance(value, (set, list)) and all(isinstance(v, str) for v in value)
    return sorted(value) if is_names else value


@pytest.mark.parametrize("peft_type", sorted(CONFIG_ARGS))
def test_get_peft_config_and_from_pretrained_return_the_methods_class(peft_type: str, tmp_path) -> None:
    ref_cls = hf.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    ref = ref_cls(**CONFIG_ARGS[peft_type])
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_dict = pk.get_peft_config(ref.to_dict())
        by_file = pk.PeftConfig.from_pretrained(tmp_path)
        by_subclass = pk.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(tmp_path)
    for cfg in (by_dict, by_file, by_subclass):
        assert type(cfg).__name__ == ref_cls.__name__
        assert type(cfg) is pk.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        ours = cfg.to_dict()
        theirs = {k: v for k, v in ref.to_dict().items() if k in ours}
        assert {k: _norm(v) for k, v in ours.items() if k in theirs} == {
            k: _norm(v) for k, v in theirs.items()
        }
    # and the other way: a file peftkit writes loads as the right class in HF peft
    out = tmp_path / "ours"
    out.mkdir()
    by_file.save_pretrained(out)
    assert type(hf.PeftConfig.from_pretrained(out)) is ref_cls
    assert type(hf.get_peft_config(by_file.to_dict())) is ref_cls


# ----- the low-level API -----------------------------------------------------------------------------------------
def _inject(lib, config_kwargs: dict, model=None, **kw):
    model = tiny_llama() if model is None else model
    out = lib.inject_adapter_in_model(lib.LoraConfig(**config_kwargs), model, **kw)
    assert out is model and not isinstance(out, (hf.PeftModel, pk.PeftModel))
    return model


def test_inject_adapter_in_model_matches_reference() -> None:
    cfg = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": False,
    }
    ref, ours = _inject(hf, cfg), _inject(pk, cfg)
    ref_sd = hf.get_peft_model_state_dict(ref)
    ours_keys = pk.get_peft_model_state_dict(ours)
    assert sorted(ref_sd) == sorted(ours_keys)
    result = pk.set_peft_model_state_dict(ours, ref_sd)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(hf.set_peft_model_state_dict(ref, ref_sd).missing_keys)
    x = token_inputs()
    with torch.no_grad():
        assert torch.allclose(output_tensor(ours(**x)), output_tensor(ref(**x)), atol=ATOL)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(ref)
    for name in pk.get_peft_model_state_dict(ours):
        torch.testing.assert_close(pk.get_peft_model_state_dict(ours)[name], ref_sd[name])


def test_inject_with_modules_to_save_and_custom_model() -> None:
    cfg = {"target_modules": ["conv1"], "modules_to_save": ["head"], "init_lora_weights": False}
    ref, ours = _inject(hf, cfg, tiny_convnet()), _inject(pk, cfg, tiny_convnet())
    ref_sd = hf.get_peft_model_state_dict(ref)
    assert sorted(pk.get_peft_model_state_dict(ours)) == sorted(ref_sd)
    with torch.no_grad():
        ref_sd = {k: v + 0.1 * torch.randn_like(v) for k, v in ref_sd.items()}
    hf.set_peft_model_state_dict(ref, ref_sd)
    pk.set_peft_model_state_dict(ours, ref_sd)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=ATOL)
    assert sum(p.requires_grad for p in ours.parameters()) == sum(p.requires_grad for p in ref.parameters())


def test_inject_from_a_state_dict_targets_its_modules() -> None:
    sd = {"model.layers.1.self_attn.v_proj.lora_A.weight": torch.zeros(4, 32)}
    for lib in (hf, pk):
        model = _inject(lib, {"r": 4, "target_modules": ["k_proj"]}, state_dict=sd)
        assert [n for n, _ in model.named_modules() if n.endswith("lora_A")] == [
            "model.layers.1.self_attn.v_proj.lora_A"
        ]


@pytest.mark.parametrize("lib", [hf, pk], ids=["peft", "peftkit"])
def test_inject_refuses_prompt_learning(lib) -> None:
    with pytest.raises(ValueError):
        lib.inject_adapter_in_model(
            lib.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), tiny_llama()
        )


def _pair_seq_cls():
    ref = hf.get_peft_model(tiny_bert_cls(), hf.LoraConfig(r=4, task_type="SEQ_CLS"))
    ours = pk.get_peft_model(tiny_bert_cls(), pk.LoraConfig(r=4, task_type="SEQ_CLS"))
    with torch.no_grad():
        sd = {k: v + 0.05 * torch.randn_like(v) for k, v in hf.get_peft_model_state_dict(ref).items()}
    hf.set_peft_model_state_dict(ref, sd)
    pk.set_peft_model_state_dict(ours, sd)
    return ref, ours, sd


def test_peft_model_state_dicts_round_trip_between_libraries() -> None:
    ref, ours, sd = _pair_seq_cls()
    ours = pk.get_peft_model(tiny_bert_cls(), pk.LoraConfig(r=4, task_type="SEQ_CLS"))  # not loaded yet
    assert sorted(pk.get_peft_model_state_dict(ours)) == sorted(sd)
    result = pk.utils.set_peft_model_state_dict(ours, {**sd, "foo.lora_A.weight": torch.zeros(1)})
    ref_result = hf.set_peft_model_state_dict(ref, {**sd, "foo.lora_A.weight": torch.zeros(1)})
    assert result.unexpected_keys == ref_result.unexpected_keys == ["foo.lora_A.weight"]
    assert sorted(result.missing_keys) == sorted(ref_result.missing_keys)
    x = token_inputs()
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(**x).logits, ref(**x).logits, atol=ATOL)
    back = pk.get_peft_model_state_dict(ours)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_set_peft_model_state_dict_shape_mismatch() -> None:
    ours = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match="q_proj"):
        pk.set_peft_model_state_dict(ours, {key: torch.zeros(8, 32)})
    with pytest.warns(UserWarning, match="skipping"):
        pk.set_peft_model_state_dict(ours, {key: torch.zeros(8, 32)}, ignore_mismatched_sizes=True)


def test_base_model_state_dicts_match_reference() -> None:
    ref, ours, _ = _pair_seq_cls()
    ref_base, ours_base = hf.get_base_model_state_dict(ref), pk.get_base_model_state_dict(ours)
    assert sorted(ours_base) == sorted(ref_base) == sorted(tiny_bert_cls().state_dict())
    assert all(torch.equal(ours_base[k], ref_base[k]) for k in ref_base)
    fresh = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ref_base.items()}
    assert tuple(pk.set_base_model_state_dict(ours, fresh)) == ([], [])
    hf.set_base_model_state_dict(ref, fresh)
    x = token_inputs()
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(**x).logits, ref(**x).logits, atol=ATOL)
    partial = dict(fresh)
    partial.pop("classifier.bias")
    for lib, model in ((hf, ref), (pk, ours)):
        with pytest.raises(RuntimeError, match="classifier.bias"):
            lib.set_base_model_state_dict(model, partial)
        assert list(lib.set_base_model_state_dict(model, partial, strict=False).missing_keys) == [
            "classifier.bias"
        ]
    # on a model with adapters injected in place as well
    injected = _inject(pk, {"target_modules": ["q_proj"]})
    assert sorted(pk.get_base_model_state_dict(injected)) == sorted(tiny_llama().state_dict())


def test_load_peft_weights_matches_reference(tmp_path) -> None:
    ref, _, sd = _pair_seq_cls()
    ref.save_pretrained(tmp_path)
    for mapping in (None, {r"layer\.(\d+)": r"block.\1"}, {"^bert": "encoder"}):
        theirs = hf.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping)
        ours = pk.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping)
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# ----- status, switches, properties ------------------------------------------------------------------------------
def _status_pair():
    ref = hf.get_peft_model(tiny_llama(), hf.LoraConfig(r=4, task_type="CAUSAL_LM"))
    ours = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, task_type="CAUSAL_LM"))
    return ref, ours


STEPS = {
    "fresh": lambda m, lib: None,
    "second adapter": lambda m, lib: m.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"])),
    "set_requires_grad": lambda m, lib: m.set_requires_grad(["b"]),
    "set_adapter": lambda m, lib: m.set_adapter("b"),
    "requires_grad off": lambda m, lib: m.set_requires_grad("b", requires_grad=False),
    "merged": lambda m, lib: m.merge_adapter(),
    "unmerged": lambda m, lib: m.unmerge_adapter(),
    "disable_adapter_layers": lambda m, lib: m.disable_adapter_layers(),
    "enable_adapter_layers": lambda m, lib: m.enable_adapter_layers(),
}


def test_layer_and_model_status_match_reference_through_a_session() -> None:
    ref, ours = _status_pair()
    for step, action in STEPS.items():
        action(ref, hf), action(ours, pk)
        for ref_status, our_status in (
            (ref.get_model_status(), ours.get_model_status()),
            (hf.get_model_status(ref), pk.get_model_status(ours)),
        ):
            assert dataclasses.asdict(our_status) == dataclasses.asdict(ref_status), step
        assert [dataclasses.asdict(s) for s in pk.get_layer_status(ours)] == [
            dataclasses.asdict(s) for s in hf.get_layer_status(ref)
        ], step


def test_status_of_injected_model_and_errors() -> None:
    cfg = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    ref, ours = _inject(hf, cfg), _inject(pk, cfg)
    for step in ("one adapter", "a second adapter injected"):
        if step != "one adapter":
            second = {"r": 2, "target_modules": ["q_proj"]}
            _inject(hf, second, ref, adapter_name="other"), _inject(pk, second, ours, adapter_name="other")
        assert dataclasses.asdict(pk.get_model_status(ours)) == dataclasses.asdict(
            hf.get_model_status(ref)
        ), step
        assert [dataclasses.asdict(s) for s in pk.get_layer_status(ours)] == [
            dataclasses.asdict(s) for s in hf.get_layer_status(ref)
        ], step
    x = token_inputs()
    with torch.no_grad():  # the second adapter (zero-initialised B) is the active one: output = base output
        assert torch.allclose(ours(**x).logits, ref(**x).logits, atol=ATOL)
    for lib in (hf, pk):
        with pytest.raises(ValueError):
            lib.get_layer_status(tiny_llama())
        prompt = lib.get_peft_model(
            tiny_llama(), lib.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
        )
        with pytest.raises(TypeError):
            lib.get_model_status(prompt)


def test_properties_and_switches_match_reference() -> None:
    ref, ours = _status_pair()
    assert ours.targeted_module_names == ref.targeted_module_names
    assert ours.base_model.targeted_module_names == ref.base_model.targeted_module_names
    assert ours.active_peft_config is ours.peft_config["default"] and ours.active_peft_config.r == 4
    assert ours.base_model_torch_dtype == ref.base_model_torch_dtype == torch.float32
    assert ours.has_active_enabled_adapter and ref.has_active_enabled_adapter
    with ours.disable_adapter(), ref.disable_adapter():
        assert not ours.has_active_enabled_adapter and not ref.has_active_enabled_adapter
    # adapters that change the output, then: disabled layers give exactly the base model's output
    sd = {k: torch.randn_like(v) for k, v in hf.get_peft_model_state_dict(ref).items()}
    hf.set_peft_model_state_dict(ref, sd), pk.set_peft_model_state_dict(ours, sd)
    x = token_inputs()
    base = tiny_llama()(**x).logits.detach()
    ours.merge_adapter()
    ref.disable_adapter_layers(), ours.disable_adapter_layers()
    with torch.no_grad():
        assert torch.allclose(ours(**x).logits, base, atol=1e-5)
        assert torch.allclose(ref(**x).logits, base, atol=1e-5)
    ref.enable_adapter_layers(), ours.enable_adapter_layers()
    with torch.no_grad():
        assert torch.allclose(ours(**x).logits, ref(**x).logits, atol=1e-5)
    assert not torch.allclose(ours(**x).logits, base, atol=1e-3)


# ----- helpers, import paths -------------------------------------------------------------------------------------
def test_prepare_model_for_kbit_training_matches_reference() -> None:
    for flag in (False, True):
        models = []
        for lib in (hf, pk):
            model = tiny_llama().to(torch.bfloat16)
            if flag:
                model.is_loaded_in_8bit = True
            models.append(lib.prepare_model_for_kbit_training(model))
        ref, ours = models
        assert [(n, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == [
            (n, p.dtype, p.requires_grad) for n, p in ref.named_parameters()
        ]
        assert ours.is_gradient_checkpointing == ref.is_gradient_checkpointing == flag


def test_shift_tokens_right_matches_reference() -> None:
    ids = torch.tensor([[5, 6, -100, 7], [1, -100, -100, 2]])
    assert torch.equal(pk.shift_tokens_right(ids, 0, 9), hf.shift_tokens_right(ids, 0, 9))


def test_integration_import_paths() -> None:
    from peftkit.tuners.lora.layer import Linear
    from peftkit.tuners.lora.layer import LoraLayer as LayerFromPath

    from peftkit.tuners.lora import LoraConfig, LoraLayer
    from peftkit.tuners.tuners_utils import BaseTunerLayer
    from peftkit.utils import ModulesToSaveWrapper, get_peft_model_state_dict, set_peft_model_state_dict
    from peftkit.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from peftkit.utils.other import _get_submodules
    from peftkit.utils.save_and_load import load_peft_weights

    assert LayerFromPath is LoraLayer and LoraConfig is pk.LoraConfig
    assert (
        get_peft_model_state_dict is pk.get_peft_model_state_dict
        and load_peft_weights is pk.load_peft_weights
    )
    assert set_peft_model_state_dict is pk.set_peft_model_state_dict
    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"] == ["q_proj", "v_proj"]
    model = pk.get_peft_model(tiny_bert_cls(), pk.LoraConfig(task_type="SEQ_CLS"))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(isinstance(m, (LoraLayer, Linear)) for m in layers)
    assert any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())
    parent, target, name = _get_submodules(model, "base_model.model.classifier")
    assert name == "classifier" and target is parent.classifier
    # a layer answers the BaseTunerLayer calls integrations make
    layer = layers[0]
    layer.enable_adapters(False)
    assert layer.disable_adapters and layer.get_base_layer() is layer.base_layer


def test_mixed_model_refuses_methods_it_cannot_mix() -> None:
    with pytest.raises(ValueError, match="IA3 adapter cannot be mixed"):
        pk.PeftMixedModel(tiny_llama(), pk.IA3Config())
