"""Method gaps closed in issue 14, side by side with HF peft where it has the feature (the conformance battery
in tests/cases.py covers the rest: DoRA on nn.Embedding, LoHa/LoKr on nn.Conv1d, VeRA bias modes)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk

from . import models as M

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("bias", ["all", "vera_only"])
def test_vera_bias_modes_train_and_save_what_hf_peft_does(bias, tmp_path) -> None:
    models = {}
    for lib in (pk, peft):
        config = lib.VeraConfig(r=8, target_modules=["c_attn"], bias=bias, init_weights=False)
        models[lib.__name__] = model = lib.get_peft_model(M.tiny_gpt2(), config)
        model.save_pretrained(tmp_path / lib.__name__)
    ours, hf = models["peftkit"], models["peft"]
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in hf.named_parameters() if p.requires_grad}
    assert any(n.endswith(".bias") for n in trainable)
    files = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peftkit", "peft")]
    assert files[0].keys() == files[1].keys()
    assert any(".bias" in k for k in files[0])


def test_lokr_conv1d_tucker_core_at_rank_one() -> None:
    """A Conv1d kernel's Tucker core at r=1 gives a dense factor with an odd stride on its size-1 dim, which
    torch.kron cannot view (HF peft 0.21 raises there); peftkit builds the update, equal to the definition."""
    conv = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1))
    config = pk.LoKrConfig(r=1, target_modules=["0"], use_effective_conv2d=True, init_weights=False)
    model = pk.get_peft_model(conv, config)
    layer = model.base_model.model[0]
    assert tuple(layer.lokr_t2["default"].shape) == (1, 1, 3, 1)
    w1 = layer.lokr_w1["default"]
    w2 = torch.einsum(
        "ijkl,ip,jr->prkl", layer.lokr_t2["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"]
    )
    expected = torch.einsum("ac,bdkl->abcdkl", w1, w2).reshape(8, 4, 3, 1) * layer.scaling["default"]
    torch.testing.assert_close(layer.delta_weight("default"), expected.reshape(8, 4, 3))
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        want = conv[0].base_layer(x) + torch.nn.functional.conv1d(x, expected.reshape(8, 4, 3), padding=1)
        torch.testing.assert_close(model(x), want)


def test_version_flag_prints_the_package_version() -> None:
    import subprocess
    import sys
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"peftkit {version('peftkit')}"


# ----- Trainer resume of prompt learning with an encoder (P-tuning MLP/LSTM, prefix projection) ----------------
ENCODER_CONFIGS = {
    "p-tuning-mlp": ("PromptEncoderConfig", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    "p-tuning-lstm": (
        "PromptEncoderConfig",
        {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM"},
    ),
    "prefix-projection": (
        "PrefixTuningConfig",
        {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16},
    ),
}


def _encoder_model(kind: str):
    from .test_trainer import tiny_gpt2

    cls, kwargs = ENCODER_CONFIGS[kind]
    torch.manual_seed(0)
    return pk.get_peft_model(tiny_gpt2(), getattr(pk, cls)(task_type="CAUSAL_LM", **kwargs))


def _encoder_state(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the prompt encoder (embedding and the MLP/LSTM/projection weights)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", list(ENCODER_CONFIGS))
def test_trainer_resume_restores_the_whole_prompt_encoder(kind, tmp_path) -> None:
    """An interrupted Trainer run resumed from its checkpoint ends exactly where the uninterrupted run ends: the
    checkpoint holds the encoder's own weights, not only the rows it computes (`prompt_embeddings`)."""
    from transformers import Trainer, TrainerCallback

    from .test_trainer_paths import checkpoint_args, lm_trainer

    full = _encoder_model(kind)
    assert any("embedding" not in n for n in _encoder_state(full))  # there is an encoder beyond the table
    lm_trainer(full, checkpoint_args(tmp_path / "full", eval_steps=4)).train()

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    interrupted = _encoder_model(kind)
    first: Trainer = lm_trainer(interrupted, checkpoint_args(tmp_path / "cut", eval_steps=4))
    first.add_callback(Stop())
    first.train()
    resumed = _encoder_model(kind)
    trainer = lm_trainer(resumed, checkpoint_args(tmp_path / "cut", eval_steps=4))
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    expected, got = _encoder_state(full), _encoder_state(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # the adapter files themselves stay HF peft's: one `prompt_embeddings` tensor
    assert list(load_file(tmp_path / "cut" / "checkpoint-4" / "adapter_model.safetensors")) == [
        "prompt_embeddings"
    ]


def test_prefix_tuning_on_an_encoder_only_model_is_refused_naming_it() -> None:
    """BERT's forward takes no KV cache: HF peft raises at the first forward; peftkit refuses up front, naming
    the model, instead of running BERT with the prefix silently dropped."""
    inputs = {k: v for k, v in M.token_inputs().items() if k in ("input_ids", "attention_mask")}
    hf = peft.get_peft_model(
        M.tiny_bert_cls(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    )
    with pytest.raises(ValueError, match="past key values"):
        hf(**inputs)
    config = pk.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    with pytest.raises(
        ValueError, match=r"BertForSequenceClassification \(model_type 'bert'\).*encoder-only"
    ):
        pk.get_peft_model(M.tiny_bert_cls(), config)
    # the methods it points to work on the same model
    for other in (
        pk.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        pk.LoraConfig(task_type="SEQ_CLS"),
    ):
        assert pk.get_peft_model(M.tiny_bert_cls(), other)(**inputs).logits.shape == (2, 3)
