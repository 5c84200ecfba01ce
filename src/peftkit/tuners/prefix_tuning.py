"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes for every attention layer.

Each virtual token is one row of `num_layers * 2 * token_dim` numbers (layout: `functional/prefix.py`),
handed to the base model as an already-filled KV cache (`DynamicCache`; for encoder-decoder models the
decoder's self-attention cache of an `EncoderDecoderCache`). Positions of the real tokens start after the
prefix, and the attention mask gets `num_virtual_tokens` ones in front. With `prefix_projection`, the rows
are computed from small embeddings by a two-layer MLP while training; files store the computed rows.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ..functional.prefix import prefix_key_values
from ..registry import register_peft_method
from .prompt_base import (
    PromptEncoderBase,
    PromptLearningConfig,
    PromptLearningTuner,
    batch_size_of,
    cache_keyword,
    cached_length,
    with_ones_before,
)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of prefix tuning (names and defaults as in HF peft's `PrefixTuningConfig`).

    For grouped-query attention (a model config with `num_key_value_heads`), `token_dim` becomes
    `num_key_value_heads * head_dim` and `num_attention_heads` becomes `num_key_value_heads`, as HF peft does.

    Attributes:
        encoder_hidden_size: hidden width of the projection MLP; None takes `token_dim`.
        prefix_projection: compute the prefix rows with `Linear -> tanh -> Linear` from `token_dim` embeddings.
        init_weights: None (random) or `"zero"` (the last layer, or the rows, start at zero).
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PREFIX_TUNING"
        if self.init_weights not in (None, "zero"):
            raise ValueError(
                f"PrefixTuningConfig: init_weights must be None or 'zero', got {self.init_weights!r}"
            )

    def resolved_for(self, model: nn.Module) -> PrefixTuningConfig:
        config = super().resolved_for(model)
        cfg = getattr(model, "config", None)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        kv_heads = getattr(cfg, "num_key_value_heads", None)
        if kv_heads is not None:  # the cache holds num_key_value_heads heads of head_dim each
            head_dim = getattr(cfg, "head_dim", None) or config.token_dim // config.num_attention_heads
            config = dataclasses.replace(config, token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
        if config.encoder_hidden_size is None:
            config = dataclasses.replace(config, encoder_hidden_size=config.token_dim)
        return config


class PrefixEncoder(PromptEncoderBase):
    """forward: () -> (num_virtual_tokens, num_layers * 2 * token_dim).

    `embedding` holds the rows themselves, or (with a projection head) `token_dim`-wide inputs to `transform`.
    """

    def __init__(self, config: PrefixTuningConfig, with_head: bool = True) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and with_head
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero":
            for p in last.parameters():
                nn.init.zeros_(p)

    def rows(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.transform(x) if self.prefix_projection else x


def check_takes_kv_cache(model: nn.Module) -> None:
    """Raise unless `model.forward` takes a KV cache (`past_key_values` / `cache`), which prefix tuning fills.

    Encoder-only models (BERT, RoBERTa, ... in transformers 5) take none: their forward would swallow the prefix
    into `**kwargs` and silently run without it. HF peft raises at the first forward ("Model does not support
    past key values"); peftkit refuses when the adapter is created, naming the model."""
    params = inspect.signature(model.forward).parameters
    if "past_key_values" in params or "cache" in params:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"Prefix tuning feeds the prefix as a KV cache, but {type(model).__name__} (model_type "
        f"{model_type!r}) takes none (its forward has no past_key_values): encoder-only models such as BERT "
        "are not supported. Use it with a decoder-only or encoder-decoder model, or adapt this model with "
        "prompt tuning, P-tuning or LoRA instead."
    )


class PrefixTuningTuner(PromptLearningTuner):
    """Prefix tuning around a base model: the rows become the base model's starting KV cache."""

    def create_encoder(
        self, config: PrefixTuningConfig, with_head: bool, init_weights: bool
    ) -> PrefixEncoder:
        if any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ValueError("prefix tuning does not work with gradient checkpointing (it feeds a KV cache)")
        check_takes_kv_cache(self.model)
        return PrefixEncoder(config, with_head=with_head)

    def prefix_cache(self, config: PrefixTuningConfig, rows: torch.Tensor, batch: int) -> Any:
        """A fresh cache holding the prefix: (batch, heads, num_virtual_tokens, head_dim) per layer."""
        dtype = self.model.get_input_embeddings().weight.dtype
        prefix = rows.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        pairs = prefix_key_values(
            prefix, config.num_layers, config.num_attention_heads, config.num_transformer_submodules
        )
        cache = DynamicCache(pairs)
        if getattr(self.model.config, "is_encoder_decoder", False):
            # the cross-attention cache starts empty: it is filled from the real encoder output
            return EncoderDecoderCache(cache, DynamicCache())
        return cache

    def prompted_call(
        self,
        call: Any,
        config: PrefixTuningConfig,
        rows: torch.Tensor,
        kwargs: dict,
        generating: bool = False,
    ) -> Any:
        n, batch = config.num_virtual_tokens, batch_size_of(kwargs)
        encdec = getattr(self.model.config, "is_encoder_decoder", False)
        mask_key = "decoder_attention_mask" if encdec else "attention_mask"
        mask = kwargs.get(mask_key)
        if mask is None and generating and not encdec:
            ids = kwargs["input_ids"]
            mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
        kwargs[mask_key] = with_ones_before(mask, n, mask.shape[0] if mask is not None else batch)
        if cached_length(kwargs):  # a later step of an incremental decode: the prefix is in the cache already
            return call(**kwargs)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        copies = self._generated_copies(kwargs) if generating else 1
        kwargs.pop("past_key_values", None)
        kwargs[cache_keyword(self.model)] = self.prefix_cache(config, rows, batch * copies)
        return call(**kwargs)

    def _generated_copies(self, kwargs: dict) -> int:
        """How many rows generate expands each input into: the beams, else the returned sequences."""
        gen = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1)) or 1
        returned = kwargs.get("num_return_sequences", getattr(gen, "num_return_sequences", 1)) or 1
        return beams if beams > 1 else returned


register_peft_method(
    peft_type="PREFIX_TUNING",
    config_cls=PrefixTuningConfig,
    tuner_cls=PrefixTuningTuner,
    prefix="prompt_encoder",
    is_prompt_learning=True,
)
