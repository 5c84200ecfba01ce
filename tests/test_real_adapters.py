"""Adapters that strangers trained with HF peft 0.5-0.20 (`../shared/real-adapters/`) load into peftkit
exactly as the reference loads them.

Each base is built from its config with random weights and a fixed seed (no Hub access); HF peft and peftkit
each wrap an identical copy, and the logits must agree (fp32, atol 1e-5). The folder is found next to the
repository clone (`<repo>/../shared/real-adapters`) or at `$PEFTKIT_REAL_ADAPTERS`; without it the tests skip, except under CI (`CI=true`), where they fail.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import peft as hf_peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import peftkit

REAL_ADAPTERS = Path(
    os.environ.get("PEFTKIT_REAL_ADAPTERS")
    or Path(__file__).resolve().parents[1].parent / "shared" / "real-adapters"
)
SEED = 1234
ATOL = 1e-5

_MISSING = f"real adapters not found at {REAL_ADAPTERS} (set PEFTKIT_REAL_ADAPTERS to the folder)"


def _in_ci() -> bool:
    """CI (`CI=true`, as GitHub Actions and `.ci/run` set it) must run these tests, never skip them."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _real_adapters_present() -> None:
    if not REAL_ADAPTERS.is_dir():
        if _in_ci():
            pytest.fail(f"{_MISSING}; CI runs these tests and does not skip them")
        pytest.skip(_MISSING)


def test_missing_folder_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(__import__(__name__, fromlist=["_"]), "REAL_ADAPTERS", tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="does not skip"):
        _real_adapters_present.__wrapped__()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        _real_adapters_present.__wrapped__()


@dataclass(frozen=True)
class RealAdapter:
    """One folder of `real-adapters/` and how to build (and feed) its base model."""

    folder: str
    build: Callable[[], nn.Module]
    wrapper: str  # the PeftModel class both libraries must return
    vocab_size: int
    heads: tuple[str, ...] = ()  # modules trained in full (saved with the adapter) when is_trainable=True

    @property
    def path(self) -> Path:
        return REAL_ADAPTERS / self.folder


def _gpt2_lm() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config())


def _gpt2_seqcls() -> nn.Module:
    return GPT2ForSequenceClassification(GPT2Config(num_labels=3, pad_token_id=50256))


def _bert_seqcls() -> nn.Module:
    return BertForSequenceClassification(BertConfig(num_labels=2))


def _smollm() -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            tie_word_embeddings=True,
        )
    )


LORA_ADAPTERS = [
    RealAdapter("gpt2_tigrinya_lora", _gpt2_lm, "PeftModelForCausalLM", 50257),
    RealAdapter(
        "gpt2_seqcls_lora_bin", _gpt2_seqcls, "PeftModelForSequenceClassification", 50257, ("score",)
    ),
    RealAdapter(
        "bert_seqcls_lora", _bert_seqcls, "PeftModelForSequenceClassification", 30522, ("classifier",)
    ),
    RealAdapter("smollm135m_instruct_medical_lora", _smollm, "PeftModel", 49152),
]
LORA_IDS = [a.folder for a in LORA_ADAPTERS]


@functools.cache
def _pristine_base(folder: str) -> nn.Module:
    """The seeded base for `folder`, built once per session; callers get deep copies."""
    spec = next(a for a in LORA_ADAPTERS if a.folder == folder)
    torch.manual_seed(SEED)
    return spec.build().eval()


@pytest.fixture(scope="module", autouse=True)
def _free_bases() -> Iterator[None]:
    """The cached bases hold ~2 GB; release them when this module is done."""
    yield
    _pristine_base.cache_clear()


def fresh_base(spec: RealAdapter) -> nn.Module:
    return copy.deepcopy(_pristine_base(spec.folder))


def sample_inputs(spec: RealAdapter) -> dict[str, torch.Tensor]:
    """Two sequences of 8 token ids (never GPT-2's pad id 50256), full attention."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(spec.vocab_size, 50000), (2, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def file_tensors(spec: RealAdapter) -> dict[str, torch.Tensor]:
    st = spec.path / "adapter_model.safetensors"
    if st.is_file():
        return load_file(st)
    return torch.load(spec.path / "adapter_model.bin", map_location="cpu", weights_only=True)


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class Loaded:
    """One adapter loaded for inference by both libraries onto identical seeded bases, with their logits."""

    spec: RealAdapter
    reference: nn.Module
    ours: nn.Module
    reference_logits: torch.Tensor
    our_logits: torch.Tensor


@pytest.fixture(scope="module", params=LORA_ADAPTERS, ids=LORA_IDS)
def loaded(request: pytest.FixtureRequest) -> Loaded:
    spec: RealAdapter = request.param
    reference = hf_peft.PeftModel.from_pretrained(fresh_base(spec), str(spec.path))
    ours = peftkit.PeftModel.from_pretrained(fresh_base(spec), str(spec.path))
    inputs = sample_inputs(spec)
    return Loaded(spec, reference, ours, logits(reference, inputs), logits(ours, inputs))


def test_logits_match_reference(loaded: Loaded) -> None:
    assert loaded.our_logits.shape == loaded.reference_logits.shape
    torch.testing.assert_close(loaded.our_logits, loaded.reference_logits, atol=ATOL, rtol=0)


def test_adapter_changes_output_and_disabling_gives_base(loaded: Loaded) -> None:
    inputs = sample_inputs(loaded.spec)
    with loaded.ours.disable_adapter():
        disabled = logits(loaded.ours, inputs)
    base = logits(_pristine_base(loaded.spec.folder), inputs)
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)
    assert (loaded.our_logits - base).abs().max() > 1e-3, "the adapter does not change the output"
    assert trainable_names(loaded.ours) == set(), "disable_adapter() must not make anything trainable"


def test_wrapper_class_and_inference_mode(loaded: Loaded) -> None:
    spec, reference, ours = loaded.spec, loaded.reference, loaded.ours
    assert type(reference).__name__ == spec.wrapper  # guards the table above against the reference
    # the wrapper class itself, specialised to the base model's forward signature (peftkit.integrations)
    assert type(ours).__name__ == spec.wrapper and isinstance(ours, getattr(peftkit, spec.wrapper))
    assert not ours.training
    assert trainable_names(ours) == set(), "is_trainable=False must leave nothing trainable"
    assert ours.peft_config["default"].inference_mode is True
    assert ours.peft_config["default"].task_type == reference.peft_config["default"].task_type


def test_adapter_state_dict_round_trips_the_file(loaded: Loaded) -> None:
    expected = file_tensors(loaded.spec)
    got = loaded.ours.get_adapter_state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_save_pretrained_rewrites_the_same_tensors(loaded: Loaded, tmp_path: Path) -> None:
    """Re-saving a loaded adapter gives the file's tensors (as safetensors) and a config HF peft reads alike."""
    loaded.ours.save_pretrained(tmp_path)
    expected = file_tensors(loaded.spec)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    ours, theirs = hf_peft.PeftConfig.from_pretrained(str(tmp_path)), loaded.reference.peft_config["default"]
    for field in ("peft_type", "task_type", "r", "lora_alpha", "fan_in_fan_out", "bias"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert set(ours.target_modules) == set(theirs.target_modules)


@pytest.mark.parametrize("spec", LORA_ADAPTERS, ids=LORA_IDS)
def test_is_trainable_makes_only_adapter_and_head_trainable(spec: RealAdapter) -> None:
    reference = hf_peft.PeftModel.from_pretrained(fresh_base(spec), str(spec.path), is_trainable=True)
    ours = peftkit.PeftModel.from_pretrained(fresh_base(spec), str(spec.path), is_trainable=True)
    names = trainable_names(ours)
    assert names, "is_trainable=True left nothing trainable"
    for name in names:
        in_head = any(f".{h}.modules_to_save." in name for h in spec.heads)
        assert ".lora_" in name or in_head, f"{name} should be frozen"
    for head in spec.heads:
        assert any(f".{head}.modules_to_save." in n for n in names), f"head {head!r} is not trainable"
    assert names == trainable_names(reference)
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()


# ----- prompt learning: bloomz-560m prompt tuning (causal) and t5-small prefix tuning (seq2seq) ---------------
# The bases have the adapters' real widths (and, for T5, depth); only the vocabulary is cut down, which the
# adapters never index (prompt tuning only reads the hidden size; bloom's 24 layers are not used by it).
PROMPT_LEARNING_ADAPTERS = {
    "bloomz560m_prompt_tuning": "PeftModelForCausalLM",
    "t5_small_prefix_tuning": "PeftModelForSeq2SeqLM",
}
SMALL_VOCAB = 1024


def _prompt_learning_base(folder: str) -> nn.Module:
    torch.manual_seed(SEED)
    if folder == "bloomz560m_prompt_tuning":
        return BloomForCausalLM(BloomConfig(vocab_size=SMALL_VOCAB, hidden_size=1024, n_layer=2, n_head=16))
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=SMALL_VOCAB,
            d_model=512,
            d_kv=64,
            d_ff=2048,
            num_layers=6,
            num_decoder_layers=6,
            num_heads=8,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
        )
    )


@pytest.mark.parametrize("folder", sorted(PROMPT_LEARNING_ADAPTERS))
def test_prompt_learning_adapter_matches_reference(folder: str) -> None:
    path = str(REAL_ADAPTERS / folder)
    base = _prompt_learning_base(folder).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMALL_VOCAB, (2, 8), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if folder.startswith("t5"):
        inputs["decoder_input_ids"] = ids[:, :3]
    base_logits = logits(base, inputs)
    reference = hf_peft.PeftModel.from_pretrained(base, path)  # prompt learning leaves the base untouched
    expected = logits(reference, inputs)
    ours = peftkit.PeftModel.from_pretrained(reference.get_base_model(), path)

    assert type(ours).__name__ == type(reference).__name__ == PROMPT_LEARNING_ADAPTERS[folder]
    assert trainable_names(ours) == set() and not ours.training
    got = logits(ours, inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with ours.disable_adapter():
        assert torch.equal(logits(ours, inputs), base_logits)
    assert (got[:, -base_logits.shape[1] :] - base_logits).abs().max() > 1e-3, "the adapter has no effect"
    expected_tensors = load_file(REAL_ADAPTERS / folder / "adapter_model.safetensors")
    state = ours.get_adapter_state_dict()
    assert sorted(state) == sorted(expected_tensors) == ["prompt_embeddings"]
    assert torch.equal(state["prompt_embeddings"], expected_tensors["prompt_embeddings"])
    theirs = reference.peft_config["default"]
    for field in (
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_layers",
        "num_attention_heads",
    ):
        assert getattr(ours.peft_config["default"], field) == getattr(theirs, field), field


# ----- IA3 on seq2seq: flan-t5-base with feedforward_modules=["wo"] -----------------------------------------------
def test_flan_t5_ia3_matches_reference() -> None:
    """k/v vectors scale outputs, wo vectors scale inputs, in encoder self-, decoder self- and cross-attention.
    The base is flan-t5-base with random weights; only the vocabulary (which IA3 does not touch) is cut down."""
    path = REAL_ADAPTERS / "flan_t5_base_ia3"
    torch.manual_seed(SEED)
    config = T5Config(
        vocab_size=1024,
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    base = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 1024, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :3]}
    base_logits = logits(base, inputs)
    reference = hf_peft.PeftModel.from_pretrained(base, str(path))
    expected = logits(reference, inputs)
    ours = peftkit.PeftModel.from_pretrained(reference.unload(), str(path))  # one 250M-param copy, not two

    assert isinstance(ours, peftkit.PeftModelForSeq2SeqLM)
    assert type(ours).__name__ == type(reference).__name__ == "PeftModelForSeq2SeqLM"
    assert trainable_names(ours) == set()
    got = logits(ours, inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base_logits).abs().max() > 1e-3, "the adapter does not change the output"
    with ours.disable_adapter():
        assert torch.equal(logits(ours, inputs), base_logits)
    expected_tensors = load_file(path / "adapter_model.safetensors")
    state = ours.get_adapter_state_dict()
    assert sorted(state) == sorted(expected_tensors)
    assert all(torch.equal(state[k], v) for k, v in expected_tensors.items())
