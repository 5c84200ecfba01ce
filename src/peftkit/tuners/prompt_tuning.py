"""Prompt tuning (Lester et al., 2021): trainable virtual-token embeddings put before the input.

The encoder is a single `nn.Embedding` of `num_virtual_tokens * num_transformer_submodules` rows of width
`token_dim`, initialised at random, from random vocabulary rows, or from the embedding of a text.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import register_peft_method
from .prompt_base import PromptEncoderBase, PromptLearningConfig, VirtualTokenTuner


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning's embeddings start: the embedding of a text, random vocabulary rows, or N(0, 1)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of prompt tuning (names and defaults as in HF peft's `PromptTuningConfig`).

    Attributes:
        prompt_tuning_init: `"RANDOM"`, `"SAMPLE_VOCAB"` or `"TEXT"`.
        prompt_tuning_init_text: the text whose token embeddings start the prompt (with `"TEXT"`); repeated or
            cut to the number of virtual tokens.
        tokenizer_name_or_path: the tokenizer (Hub id or local folder) for `"TEXT"`, loaded with AutoTokenizer.
        tokenizer_kwargs: extra `AutoTokenizer.from_pretrained` arguments (`trust_remote_code` is dropped).
    """

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PROMPT_TUNING"
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in PromptTuningInit._value2member_map_:
            allowed = ", ".join(PromptTuningInit._value2member_map_)
            raise ValueError(f"PromptTuningConfig: prompt_tuning_init must be one of {allowed}, got {init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path")
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("PromptTuningConfig: tokenizer_kwargs only apply with prompt_tuning_init='TEXT'")


def text_token_ids(config: PromptTuningConfig, count: int) -> list[int]:
    """Token ids of `prompt_tuning_init_text`, repeated or cut to exactly `count`."""
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError("PromptTuningConfig: prompt_tuning_init_text tokenizes to no tokens")
    return (ids * math.ceil(count / len(ids)))[:count]


class PromptEmbedding(PromptEncoderBase):
    """`embedding`: (num_virtual_tokens * num_transformer_submodules, token_dim); forward returns its weight."""

    def __init__(
        self, config: PromptTuningConfig, word_embeddings: nn.Embedding, init_weights: bool = True
    ) -> None:
        super().__init__()
        rows = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(rows, config.token_dim)
        if not init_weights or config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        vocab = word_embeddings.weight
        if config.prompt_tuning_init == "TEXT":
            ids = torch.tensor(text_token_ids(config, rows), device=vocab.device)
        else:  # SAMPLE_VOCAB
            ids = torch.randint(0, vocab.shape[0], (rows,), device=vocab.device)
        with torch.no_grad():
            self.embedding.weight.copy_(vocab[ids].float())


class PromptTuningTuner(VirtualTokenTuner):
    """Prompt tuning around a base model (see `VirtualTokenTuner` for how the rows are used)."""

    def create_encoder(
        self, config: PromptTuningConfig, with_head: bool, init_weights: bool
    ) -> PromptEmbedding:
        return PromptEmbedding(config, self.model.get_input_embeddings(), init_weights=init_weights)


register_peft_method(
    peft_type="PROMPT_TUNING",
    config_cls=PromptTuningConfig,
    tuner_cls=PromptTuningTuner,
    prefix="prompt_encoder",
    is_prompt_learning=True,
)
