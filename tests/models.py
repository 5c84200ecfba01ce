"""Tiny random models built from configs (offline, seeded), one per layer family peftkit must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 128


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, **config: object) -> nn.Module:
    """config: GPT2Config overrides (e.g. the dropout probabilities)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        **config,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_config(**overrides: object) -> BertConfig:
    """The tiny BERT every test uses (3 labels); `overrides` change any BertConfig field."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertConfig(**{**fields, **overrides})


def tiny_bert(cls: type = BertForSequenceClassification, seed: int = 0, **overrides: object) -> nn.Module:
    """A seeded tiny BERT with the head class `cls` (sequence classification by default)."""
    torch.manual_seed(seed)
    return cls(tiny_bert_config(**overrides)).eval()


def tiny_bert_cls(seed: int = 0) -> nn.Module:
    return tiny_bert(seed=seed)


def tiny_t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bloom(seed: int = 0) -> nn.Module:
    """Bloom: fused query_key_value and ALiBi positions (no position embeddings)."""
    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return BloomForCausalLM(cfg).eval()


def sharp(factory, std: float = 0.3):
    """`factory` with every matrix redrawn from N(0, std): with the default tiny init (0.02) attention is nearly
    uniform and values tiny, so virtual tokens (prompt learning) can barely move the output; here they can."""

    def make(seed: int = 0) -> nn.Module:
        model = factory(seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return model

    make.__name__ = f"sharp_{factory.__name__}"
    return make


class ConvNet(nn.Module):
    """A custom (non-transformers) model with Conv2d layers and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 4, 4) -> (N, 5)."""
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


class Conv1dNet(nn.Module):
    """A custom model with nn.Conv1d layers (kernel 3 and 1) and a Linear head (audio/sequence style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 32, 3, padding=1)
        self.conv2 = nn.Conv1d(32, 16, 1)
        self.head = nn.Linear(16 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 8, 6) -> (N, 5)."""
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def tiny_conv1d_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Conv1dNet().eval()


def sequence_inputs(seed: int = 1) -> dict:
    """Inputs of `tiny_conv1d_net`: (2, 8, 6)."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 8, 6, generator=g)}


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def token_inputs(seed: int = 1, batch: int = 2, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def seq2seq_inputs(seed: int = 1, batch: int = 2, seq: int = 8, target: int = 6) -> dict:
    """Encoder ids and mask plus decoder ids, for encoder-decoder LMs (T5)."""
    g = torch.Generator().manual_seed(seed)
    inputs = token_inputs(seed, batch, seq)
    inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, target), generator=g)
    return inputs


def image_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 3, 4, 4, generator=g)}


def output_tensor(out) -> torch.Tensor:
    """The comparable tensor of a model output (logits, or the tensor a custom model returns)."""
    return out if isinstance(out, torch.Tensor) else out.logits
