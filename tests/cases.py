"""Conformance cases: for each registered method, the (model, config, inputs) combinations every layer
type and variant must pass. A registered method without an entry here fails `test_every_method_has_cases`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import models as M


@dataclass(frozen=True)
class Case:
    id: str
    peft_type: str
    model: Callable
    config: dict[str, Any]
    inputs: Callable = M.token_inputs
    # init that changes the base weights (PiSSA/OLoRA): disabling gives the residual base, not the original
    changes_base: bool = False
    # init that leaves the output unchanged (B = 0): the adapter has no effect until trained
    identity_init: bool = False
    # the method's init is an identity (IA3 ones, LN tuning copies): the battery adds seeded noise to every
    # trainable tensor after creation so each check sees a real update
    perturb: bool = False
    # learning rate of the loss-falls check; methods that train only a few scale vectors need a larger one
    lr: float = 3e-2
    task_type: str | None = "CAUSAL_LM"
    extra: dict = field(default_factory=dict)


_RANDOM = {"init_lora_weights": False}  # non-zero B so every check sees a real update

CASES: list[Case] = [
    Case("lora-llama-linear", "LORA", M.tiny_llama, {"r": 4, "lora_alpha": 8, **_RANDOM}),
    Case(
        "lora-llama-all-linear-rslora",
        "LORA",
        M.tiny_llama,
        {"r": 4, "target_modules": "all-linear", "use_rslora": True, **_RANDOM},
    ),
    Case(
        "lora-llama-embedding",
        "LORA",
        M.tiny_llama,
        {"r": 4, "target_modules": ["embed_tokens", "q_proj"], **_RANDOM},
    ),
    Case(
        "lora-llama-patterns",
        "LORA",
        M.tiny_llama,
        {
            "r": 4,
            "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 16},
            **_RANDOM,
        },
    ),
    Case(
        "lora-llama-layers",
        "LORA",
        M.tiny_llama,
        {
            "r": 4,
            "target_modules": ["v_proj", "o_proj", "down_proj"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
            **_RANDOM,
        },
    ),
    Case("dora-llama", "LORA", M.tiny_llama, {"r": 4, "use_dora": True, **_RANDOM}),
    Case(
        "dora-llama-embedding",
        "LORA",
        M.tiny_llama,
        {"r": 4, "target_modules": ["embed_tokens", "q_proj"], "use_dora": True, **_RANDOM},
        lr=0.1,  # random (N(0, 1)) embedding factors: the normalised update moves slowly at the default 3e-2
    ),
    Case(
        "lora-gpt2-conv1d", "LORA", M.tiny_gpt2, {"r": 4, "target_modules": ["c_attn", "c_proj"], **_RANDOM}
    ),
    Case(
        "dora-gpt2-conv1d",
        "LORA",
        M.tiny_gpt2,
        {"r": 4, "target_modules": ["c_attn"], "use_dora": True, **_RANDOM},
    ),
    Case("lora-gpt2-bias-all", "LORA", M.tiny_gpt2, {"r": 4, "bias": "all", **_RANDOM}),
    Case("lora-gpt2-bias-lora-only", "LORA", M.tiny_gpt2, {"r": 4, "bias": "lora_only", **_RANDOM}),
    Case("lora-bert-seqcls", "LORA", M.tiny_bert_cls, {"r": 4, **_RANDOM}, task_type="SEQ_CLS"),
    Case(
        "dora-bert-seqcls",
        "LORA",
        M.tiny_bert_cls,
        {"r": 4, "use_dora": True, **_RANDOM},
        task_type="SEQ_CLS",
    ),
    Case(
        "lora-conv2d",
        "LORA",
        M.tiny_convnet,
        {"r": 2, "target_modules": ["conv1", "conv2", "head"], **_RANDOM},
        inputs=M.image_inputs,
        task_type=None,
    ),
    Case(
        "dora-conv2d",
        "LORA",
        M.tiny_convnet,
        {"r": 2, "target_modules": ["conv1", "conv2"], "use_dora": True, **_RANDOM},
        inputs=M.image_inputs,
        task_type=None,
    ),
    Case("lora-default-init", "LORA", M.tiny_gpt2, {"r": 4}, identity_init=True),
    Case(
        "lora-gaussian-init",
        "LORA",
        M.tiny_llama,
        {"r": 4, "init_lora_weights": "gaussian"},
        identity_init=True,
    ),
    Case("lora-pissa", "LORA", M.tiny_llama, {"r": 4, "init_lora_weights": "pissa"}, changes_base=True),
    Case("lora-pissa-conv1d", "LORA", M.tiny_gpt2, {"r": 4, "init_lora_weights": "pissa"}, changes_base=True),
    Case("lora-olora", "LORA", M.tiny_llama, {"r": 4, "init_lora_weights": "olora"}, changes_base=True),
]

# ----- AdaLoRA (rank reallocation itself is tested in test_adalora.py) -----
CASES += [
    Case("adalora-llama", "ADALORA", M.tiny_llama, {"init_r": 4, "target_r": 2, "total_step": 10, **_RANDOM}),
    Case(  # E starts at zero: the battery's noise makes the delta non-zero, so every check sees an update
        "adalora-gpt2-conv1d",
        "ADALORA",
        M.tiny_gpt2,
        {"init_r": 4, "total_step": 10, "lora_alpha": 32},
        perturb=True,
    ),
]

# ----- weight-changing methods other than LoRA (IA3, LN tuning, VeRA, LoHa, LoKr) -----
CASES += [
    Case(
        "ia3-llama-all-linear-random-init",
        "IA3",
        M.tiny_llama,
        {"target_modules": "all-linear", "feedforward_modules": ["down_proj"], "init_ia3_weights": False},
        lr=0.3,
    ),
    Case("ia3-gpt2-conv1d", "IA3", M.tiny_gpt2, {}, perturb=True, lr=0.3),
    Case("ia3-bert-seqcls", "IA3", M.tiny_bert_cls, {}, task_type="SEQ_CLS", perturb=True),
    Case(
        "ia3-t5-feedforward",
        "IA3",
        M.tiny_t5,
        {"target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]},
        inputs=M.seq2seq_inputs,
        task_type="SEQ_2_SEQ_LM",
        perturb=True,
    ),
    Case(
        "ia3-conv2d",
        "IA3",
        M.tiny_convnet,
        {"target_modules": ["conv1", "conv2", "head"], "feedforward_modules": ["conv2"]},
        inputs=M.image_inputs,
        task_type=None,
        perturb=True,
    ),
]

# ----- OFT (nn.Linear, nn.Conv2d, nn.Embedding as in HF peft; no GPT-2 Conv1D). Default init is the identity
# rotation, hence perturb. HF interop holds at the battery's fp32 atol 1e-5 (same Cayley formulas), so no
# looser tolerance is needed. Conv2d: 1x1 (HF's forward for larger kernels is not self-consistent, see
# tests/test_oft.py) -----
CASES += [
    Case(
        "oft-llama",
        "OFT",
        M.tiny_llama,
        {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        perturb=True,
        lr=0.1,
    ),
    Case(
        "oft-llama-random-init-exact-cayley-share",
        "OFT",
        M.tiny_llama,
        {
            "r": 2,
            "oft_block_size": 0,
            "target_modules": "all-linear",
            "init_weights": False,
            "use_cayley_neumann": False,
            "block_share": True,
        },
        lr=0.1,
    ),
    Case(
        "oft-llama-coft",
        "OFT",
        M.tiny_llama,
        {"oft_block_size": 8, "target_modules": "all-linear", "coft": True, "eps": 8.0},
        perturb=True,
        lr=0.1,
    ),
    Case(
        "oft-conv2d",
        "OFT",
        M.tiny_convnet,
        {"oft_block_size": 4, "target_modules": ["conv2", "head"]},
        inputs=M.image_inputs,
        task_type=None,
        perturb=True,
    ),
]

# ----- LN tuning: a trainable copy of each norm -----
CASES += [
    Case("ln-tuning-llama", "LN_TUNING", M.tiny_llama, {}, perturb=True, lr=0.1),
    Case(
        "ln-tuning-bert-seqcls",
        "LN_TUNING",
        M.tiny_bert_cls,
        {"target_modules": ["LayerNorm"]},
        task_type="SEQ_CLS",
        perturb=True,
    ),
]

# ----- VeRA: shared frozen projections; one case regenerates them from the seed -----
CASES += [
    Case("vera-llama", "VERA", M.tiny_llama, {"r": 4, "init_weights": False}, lr=0.3),
    Case(
        "vera-gpt2-conv1d",
        "VERA",
        M.tiny_gpt2,
        {"r": 32, "target_modules": ["c_attn", "c_proj", "c_fc"], "init_weights": False},
        lr=0.1,
    ),
    Case(
        "vera-bert-seqcls-projection-from-seed",
        "VERA",
        M.tiny_bert_cls,
        {"r": 4, "init_weights": False, "save_projection": False, "projection_prng_key": 3},
        task_type="SEQ_CLS",
        lr=0.1,
    ),
    # bias modes as in HF peft: "all" trains and saves every bias, "vera_only" those of the adapted layers
    *(
        Case(
            f"vera-gpt2-bias-{bias.replace('_', '-')}",
            "VERA",
            M.tiny_gpt2,
            {"r": 32, "target_modules": ["c_attn", "c_proj", "c_fc"], "bias": bias, "init_weights": False},
            lr=0.1,
        )
        for bias in ("all", "vera_only")
    ),
]

# ----- LoHa (nn.Linear, nn.Conv2d; nn.Conv1d below, as in HF peft) -----
CASES += [
    Case("loha-llama", "LOHA", M.tiny_llama, {"r": 4, "init_weights": False}),
    Case("loha-bert-seqcls", "LOHA", M.tiny_bert_cls, {"r": 4, "init_weights": False}, task_type="SEQ_CLS"),
    Case(
        "loha-conv2d-effective",
        "LOHA",
        M.tiny_convnet,
        {
            "r": 2,
            "target_modules": ["conv1", "conv2", "head"],
            "use_effective_conv2d": True,
            "init_weights": False,
        },
        inputs=M.image_inputs,
        task_type=None,
    ),
]

# ----- LoHa and LoKr on nn.Conv1d (kernel 3 and 1): flattened kernels, and Tucker cores (r, r, k, 1) -----
_SEQ = {"inputs": M.sequence_inputs, "task_type": None}
_C1 = ["conv1", "conv2", "head"]
CASES += [
    Case(
        "loha-conv1d",
        "LOHA",
        M.tiny_conv1d_net,
        {"r": 2, "target_modules": _C1, "init_weights": False},
        **_SEQ,
    ),
    Case(
        "loha-conv1d-effective",
        "LOHA",
        M.tiny_conv1d_net,
        {"r": 2, "target_modules": _C1, "use_effective_conv2d": True, "init_weights": False},
        **_SEQ,
    ),
    Case(
        "lokr-conv1d-full-w2",
        "LOKR",
        M.tiny_conv1d_net,
        {"r": 8, "target_modules": _C1, "init_weights": False},
        **_SEQ,
    ),
    Case(
        "lokr-conv1d-effective",
        "LOKR",
        M.tiny_conv1d_net,
        {"r": 2, "target_modules": _C1, "use_effective_conv2d": True, "init_weights": False},
        **_SEQ,
    ),
]

# ----- LoKr (nn.Linear and nn.Conv2d; nn.Conv1d above) -----
CASES += [
    Case(
        "lokr-llama-decompose-both",
        "LOKR",
        M.tiny_llama,
        {
            "r": 2,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "decompose_both": True,
            "init_weights": False,
        },
    ),
    Case("lokr-llama-full-factors", "LOKR", M.tiny_llama, {"r": 8, "alpha": 16, "init_weights": False}),
    Case(
        "lokr-conv2d-effective",
        "LOKR",
        M.tiny_convnet,
        {
            "r": 1,
            "target_modules": ["conv1", "conv2", "head"],
            "use_effective_conv2d": True,
            "init_weights": False,
        },
        inputs=M.image_inputs,
        task_type=None,
    ),
]

# ----- prompt learning (prompt tuning, prefix tuning, P-tuning): no layers, one prompt encoder per adapter;
# the battery branches on the registry's is_prompt_learning (no merge; virtual tokens lengthen causal logits).
# Decoder-only models are `sharp` (larger random weights) so a few virtual tokens can steer them in the training
# check; T5 keeps its default init (its battery loss is a regression on the logits, which sharp weights blow up).
_VT = {"num_virtual_tokens": 4}
_S2S = {"inputs": M.seq2seq_inputs, "task_type": "SEQ_2_SEQ_LM"}
CASES += [
    Case("prompt-tuning-llama", "PROMPT_TUNING", M.sharp(M.tiny_llama), _VT, lr=0.1),
    Case(
        "prompt-tuning-gpt2-sample-vocab",
        "PROMPT_TUNING",
        M.sharp(M.tiny_gpt2),
        {**_VT, "prompt_tuning_init": "SAMPLE_VOCAB"},
        lr=0.1,
    ),
    Case("prompt-tuning-bloom", "PROMPT_TUNING", M.sharp(M.tiny_bloom), _VT, lr=0.1),
    Case("prompt-tuning-t5", "PROMPT_TUNING", M.tiny_t5, {"num_virtual_tokens": 8}, lr=0.3, **_S2S),
    Case("prompt-tuning-bert-seqcls", "PROMPT_TUNING", M.tiny_bert_cls, _VT, task_type="SEQ_CLS"),
    Case("prefix-tuning-llama-gqa", "PREFIX_TUNING", M.sharp(M.tiny_llama), _VT, lr=0.1),
    Case("prefix-tuning-gpt2", "PREFIX_TUNING", M.sharp(M.tiny_gpt2), _VT, lr=0.1),
    Case("prefix-tuning-bloom", "PREFIX_TUNING", M.sharp(M.tiny_bloom), _VT, lr=0.1),
    Case(
        "prefix-tuning-projection-llama",
        "PREFIX_TUNING",
        M.sharp(M.tiny_llama),
        {**_VT, "prefix_projection": True, "encoder_hidden_size": 16},
        lr=0.1,
    ),
    Case("prefix-tuning-t5", "PREFIX_TUNING", M.tiny_t5, _VT, lr=0.3, **_S2S),
    Case("p-tuning-mlp-llama", "P_TUNING", M.sharp(M.tiny_llama), {**_VT, "encoder_hidden_size": 16}, lr=0.1),
    Case(
        "p-tuning-lstm-gpt2",
        "P_TUNING",
        M.sharp(M.tiny_gpt2),
        {**_VT, "encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM"},
        lr=0.1,
    ),
    Case("p-tuning-t5", "P_TUNING", M.tiny_t5, {**_VT, "encoder_hidden_size": 16}, lr=0.1, **_S2S),
    Case(
        "p-tuning-bert-seqcls",
        "P_TUNING",
        M.tiny_bert_cls,
        {**_VT, "encoder_hidden_size": 16},
        task_type="SEQ_CLS",
    ),
]

# ----- BOFT (nn.Linear and nn.Conv2d, as in HF peft). One butterfly factor: HF peft without its CUDA extension
# (always on CPU) forces boft_n_butterfly_factor=1; the multi-factor math is checked in tests/test_oft.py -----
CASES += [
    Case(
        "boft-llama",
        "BOFT",
        M.tiny_llama,
        {"boft_block_size": 4, "target_modules": "all-linear"},
        perturb=True,
    ),
    Case(
        "boft-llama-block-num-random-init",
        "BOFT",
        M.tiny_llama,
        {"boft_block_num": 4, "boft_block_size": 0, "init_weights": False},
        lr=0.1,
    ),
    Case(
        "boft-conv2d",
        "BOFT",
        M.tiny_convnet,
        {"boft_block_size": 9, "target_modules": ["conv1"]},
        inputs=M.image_inputs,
        task_type=None,
        perturb=True,
    ),
]

# ----- LoRA options (issue 16): lora_bias (B with a bias; merging moves it into the base bias) -----
CASES += [
    Case("lora-gpt2-lora-bias", "LORA", M.tiny_gpt2, {"r": 4, "lora_bias": True, **_RANDOM}),
    Case(
        "lora-conv2d-lora-bias",
        "LORA",
        M.tiny_convnet,
        {"r": 2, "target_modules": ["conv1", "head"], "lora_bias": True, **_RANDOM},
        inputs=M.image_inputs,
        task_type=None,
    ),
    Case(
        "lora-bert-lora-bias-default-init",
        "LORA",
        M.tiny_bert_cls,
        {"r": 4, "lora_bias": True},
        task_type="SEQ_CLS",
        identity_init=True,
    ),
]

# ----- trainable tokens: only the embedding rows of the given ids train (GPT-2: the tied head reads them too).
# Default init copies the current rows (an identity), hence perturb; half the ids train so the loss can fall
# (Llama sharp: with its default 0.02 init, the embedding alone barely moves the output) -----
_TOKENS = {"token_indices": list(range(1, M.VOCAB, 2))}
CASES += [
    Case("trainable-tokens-llama", "TRAINABLE_TOKENS", M.sharp(M.tiny_llama), _TOKENS, perturb=True, lr=0.1),
    Case("trainable-tokens-gpt2-tied", "TRAINABLE_TOKENS", M.tiny_gpt2, _TOKENS, perturb=True, lr=0.1),
    Case(
        "trainable-tokens-gpt2-named-random-init",
        "TRAINABLE_TOKENS",
        M.tiny_gpt2,
        {**_TOKENS, "target_modules": ["wte"], "init_weights": False},
        lr=0.1,
    ),
]

# ----- target_parameters: LoRA on MoE expert stacks (3-D nn.Parameters, no Linear) -----
from .moe_models import tiny_mixtral  # noqa: E402

CASES += [
    Case(
        "lora-mixtral-target-parameters",
        "LORA",
        tiny_mixtral,
        {"r": 2, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"], **_RANDOM},
    ),
    Case(
        "lora-mixtral-modules-and-parameters",
        "LORA",
        tiny_mixtral,
        {"r": 2, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.down_proj"], **_RANDOM},
    ),
    Case(
        "lora-mixtral-target-parameters-default-init",
        "LORA",
        tiny_mixtral,
        {"r": 2, "target_parameters": ["experts.gate_up_proj"]},
        identity_init=True,
    ),
]
