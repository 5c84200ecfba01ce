"""P-tuning (Liu et al., 2021): virtual-token embeddings computed by a small MLP or bidirectional LSTM.

While training, each row is `head(embedding)`; the adapter file stores the computed rows, so a loaded
adapter is a plain embedding table (the head is not saved, as in HF peft).
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import register_peft_method
from .prompt_base import PromptEncoderBase, PromptLearningConfig, VirtualTokenTuner


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of P-tuning (names and defaults as in HF peft's `PromptEncoderConfig`).

    Attributes:
        encoder_reparameterization_type: `"MLP"` (three Linear layers with ReLU) or `"LSTM"` (a bidirectional
            LSTM followed by a two-layer MLP).
        encoder_hidden_size: hidden width of the head; None takes `token_dim`.
        encoder_num_layers: LSTM layers (the MLP always has three Linear layers; other values warn).
        encoder_dropout: dropout between LSTM layers.
    """

    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "P_TUNING"
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in ("MLP", "LSTM"):
            raise ValueError(
                f"PromptEncoderConfig: encoder_reparameterization_type must be MLP or LSTM, got {kind!r}"
            )
        self.encoder_reparameterization_type = kind
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(
                f"PromptEncoderConfig: encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}"
            )

    def resolved_for(self, model: nn.Module) -> PromptEncoderConfig:
        import dataclasses

        config = super().resolved_for(model)
        if config.encoder_hidden_size is None:
            config = dataclasses.replace(config, encoder_hidden_size=config.token_dim)
        return config


class PromptEncoder(PromptEncoderBase):
    """`embedding`: (num_virtual_tokens * num_transformer_submodules, token_dim), plus `mlp_head` (and
    `lstm_head` for LSTM) when built `with_head`. forward: () -> (rows, token_dim)."""

    def __init__(self, config: PromptEncoderConfig, with_head: bool = True) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, dim)
        self.kind = config.encoder_reparameterization_type if with_head else None
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        elif self.kind == "MLP":
            if config.encoder_num_layers != 2:
                warnings.warn(
                    "P-tuning with an MLP head ignores encoder_num_layers (always 3 Linear layers)",
                    stacklevel=2,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def rows(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.kind == "LSTM":
            return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0])[0]
        if self.kind == "MLP":
            return self.mlp_head(x)
        return x


class PTuningTuner(VirtualTokenTuner):
    """P-tuning around a base model (see `VirtualTokenTuner` for how the rows are used)."""

    def create_encoder(
        self, config: PromptEncoderConfig, with_head: bool, init_weights: bool
    ) -> PromptEncoder:
        return PromptEncoder(config, with_head=with_head)


register_peft_method(
    peft_type="P_TUNING",
    config_cls=PromptEncoderConfig,
    tuner_cls=PTuningTuner,
    prefix="prompt_encoder",
    is_prompt_learning=True,
)
