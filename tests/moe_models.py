"""Tiny MoE models whose experts are 3-D parameters (transformers 5), for LoRA's target_parameters."""

from __future__ import annotations

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from .models import VOCAB


def tiny_mixtral(seed: int = 0) -> nn.Module:
    """Experts as `mlp.experts.gate_up_proj` (4, 96, 32) and `mlp.experts.down_proj` (4, 32, 48); 2 of 4 routed."""
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(cfg).eval()
