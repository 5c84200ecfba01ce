"""What prompt tuning, prefix tuning and P-tuning share: the config fields, the prompt-encoder contract and the
tuner that holds one encoder per adapter around an untouched base model.

These methods add no layers to the base model. The tuner (`PeftModel.base_model`) owns `prompt_encoder`, a
ModuleDict keyed by adapter name, and changes only what the base model is called with: virtual-token
embeddings put in front of the input (`PromptTuner`, in `prompt_tuning.py` and `p_tuning.py`) or key/value
prefixes handed over as a `DynamicCache` (prefix tuning, `prefix_tuning.py`). The base model's weights stay
frozen; nothing can be merged.

Adapter files hold one tensor, `prompt_embeddings`: the encoder's output rows, so an adapter trained with a
reparameterisation (an MLP, an LSTM, a projection) loads as plain rows, exactly as HF peft writes and reads it.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from .base import BaseTuner

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"  # the one tensor of a prompt-learning adapter file

NO_MERGE = "prompt-learning methods have no weights to merge"


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (names and defaults as in HF peft).

    Fields left None are filled from the base model's config when the adapter is created (as HF peft does).

    Attributes:
        num_virtual_tokens: virtual tokens added per transformer submodule (required, > 0).
        token_dim: hidden size of the base model's token embeddings (for prefix tuning on grouped-query
            attention: `num_key_value_heads * head_dim`, the width of one cached key).
        num_transformer_submodules: 1, or 2 for encoder-decoder models (prompts for encoder and decoder).
        num_attention_heads: heads of the base model (prefix tuning: of its cached keys/values).
        num_layers: transformer layers of the base model.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        n = self.num_virtual_tokens
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ValueError(f"{name}: num_virtual_tokens must be a positive integer, got {n!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"{name}: num_transformer_submodules must be 1 or 2 (encoder-decoder), "
                f"got {self.num_transformer_submodules!r}"
            )

    def resolved_for(self, model: nn.Module) -> PromptLearningConfig:
        """A copy with every None size filled from `model.config` (HF peft's rules)."""
        if self.num_virtual_tokens is None:
            raise ValueError(f"{type(self).__name__}: num_virtual_tokens is required (e.g. 20)")
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        changes: dict[str, Any] = {}
        for field_name, keys in _MODEL_CONFIG_KEYS.items():
            if getattr(self, field_name) is None:
                changes[field_name] = _read_model_config(cfg, field_name, keys)
        if self.num_transformer_submodules is None:
            changes["num_transformer_submodules"] = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1
        return dataclasses.replace(self, **changes)


_MODEL_CONFIG_KEYS = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


def _read_model_config(cfg: Any, field_name: str, keys: tuple[str, ...]) -> int:
    for key in keys:
        value = getattr(cfg, key, None)
        if value is not None:
            return value
    raise ValueError(
        f"Cannot read {field_name} from the base model's config (looked for {keys}); set it in the config"
    )


class PromptEncoderBase(nn.Module):
    """One adapter's prompt encoder: `forward()` gives its virtual-token rows.

    Every encoder has `embedding` (an `nn.Embedding`, one row per virtual token). A reparameterised encoder
    (P-tuning's MLP/LSTM, prefix tuning's projection) also has a head that computes the rows from it while
    training; built `with_head=False` it is only `embedding`, holding the computed rows, which is what an
    adapter file stores.
    """

    embedding: nn.Embedding

    def rows(self) -> torch.Tensor:
        """The virtual-token rows: (num_rows, row_width)."""
        return self.embedding.weight

    def forward(self) -> torch.Tensor:
        return self.rows()


class PromptLearningTuner(BaseTuner):
    """Holds the base model (`self.model`, untouched) and one prompt encoder per adapter.

    Subclasses implement `create_encoder` and `prompted_call` (how the base model is called with the prompt).
    """

    prefix = "prompt_encoder"
    is_prompt_learning = True

    def __init__(
        self, model: nn.Module, config: PeftConfig, adapter_name: str = "default", init_weights: bool = True
    ) -> None:
        nn.Module.__init__(self)
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.prompt_encoder.holds_prompt_encoders = (
            True  # io.adapter_key_map finds it by this, wherever it sits
        )
        self.active_adapter: str | list[str] = adapter_name
        self._enabled = True
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject_adapter(config, adapter_name, init_weights=init_weights)

    # ----- the method's hooks --------------------------------------------------------------------------------
    def create_encoder(
        self, config: PromptLearningConfig, with_head: bool, init_weights: bool
    ) -> PromptEncoderBase:
        """A new encoder for `config`; `with_head=False` builds the plain-rows form (inference, or file loading)."""
        raise NotImplementedError

    def prompted_call(
        self,
        call: Any,
        config: PromptLearningConfig,
        rows: torch.Tensor,
        kwargs: dict,
        generating: bool = False,
    ) -> Any:
        """Call `call` (the base model's forward, or its generate when `generating`) with the prompt `rows`
        (the active encoder's output) applied to `kwargs`."""
        raise NotImplementedError

    # ----- adapters --------------------------------------------------------------------------------------------
    def resolve_config(self, config: PeftConfig) -> PeftConfig:
        return config.resolved_for(self.model)

    def inject_adapter(self, config: PeftConfig, adapter_name: str, init_weights: bool = True) -> None:
        """Create `adapter_name`'s encoder. Loading from a file (`init_weights=False`) or `inference_mode` builds
        it without a reparameterisation head: the file holds the computed rows, not the head's weights."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete it first")
        config = self.resolve_config(config)
        with_head = init_weights and not config.inference_mode
        encoder = self.create_encoder(config, with_head=with_head, init_weights=init_weights)
        ref = self.model.get_input_embeddings().weight
        self.prompt_encoder[adapter_name] = encoder.to(ref.device)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)

    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter: only its encoder trains (unless its config is inference-only)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"prompt-learning methods use one adapter at a time, got {names}")
        trainable = names[0] in self.peft_config and not self.peft_config[names[0]].inference_mode
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and name == names[0])
        self.active_adapter = names[0]

    def delete_adapter(self, adapter_name: str) -> None:
        del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]

    def adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(())

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Inside the block, forward and generate run the plain base model."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def tensors_for_saving(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The file stores the encoder's computed rows as `prompt_embeddings` (for a head-less encoder, its
        embedding weight itself): (num_rows, row_width)."""
        with torch.no_grad():
            rows = self.prompt_encoder[adapter_name]().detach()
        return {**tensors, PROMPT_EMBEDDINGS_KEY: rows}

    # ----- running -------------------------------------------------------------------------------------------
    def _active_prompt(self) -> tuple[PromptLearningConfig, torch.Tensor] | None:
        name = self.active_adapter
        if not self._enabled or name not in self.prompt_encoder:
            return None
        return self.peft_config[name], self.prompt_encoder[name]()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self._active_prompt()
        if active is None or args:
            if args and active is not None:
                raise TypeError("prompt-learning models take keyword arguments only (input_ids=..., ...)")
            return self.model(*args, **kwargs)
        return self.prompted_call(self.model, active[0], active[1], kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`model.generate` with the prompt applied on the first step only (later steps reuse the KV cache)."""
        active = self._active_prompt()
        if active is None:
            return self.model.generate(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        if kwargs.get("input_ids") is None:
            raise ValueError("generate with a prompt-learning adapter needs input_ids")
        return self.prompted_call(self.model.generate, active[0], active[1], kwargs, generating=True)

    # ----- nothing to merge ---------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(NO_MERGE)

    def unmerge_adapter(self) -> None:
        raise ValueError(NO_MERGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(f"{NO_MERGE}; use unload() to get the base model back")

    def unload(self) -> nn.Module:
        """The base model (it was never modified)."""
        self.peft_config.clear()
        return self.model


def batch_size_of(kwargs: dict) -> int:
    """Batch size from input_ids or inputs_embeds."""
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None:
        raise ValueError("prompt-learning models need input_ids or inputs_embeds")
    return ref.shape[0]


def with_ones_before(mask: torch.Tensor | None, n: int, batch: int) -> torch.Tensor | None:
    """`mask` (batch, seq) with `n` ones put in front (None stays None)."""
    if mask is None:
        return None
    return torch.cat([mask.new_ones(batch, n), mask], dim=1)


def cache_keyword(model: nn.Module) -> str:
    """The base model's name for its KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cached_length(kwargs: dict) -> int:
    """Tokens already in a cache the caller passed (0 if none): the prompt is then already inside it."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


class VirtualTokenTuner(PromptLearningTuner):
    """Prompt tuning and P-tuning: the prompt rows are input embeddings put before the real tokens.

    Decoder-only models see `[prompt; input]` (attention mask extended with ones, token labels with -100);
    encoder-decoder models get the first `num_virtual_tokens` rows before the encoder input only, as HF peft does.
    """

    def prompted_call(
        self,
        call: Any,
        config: PromptLearningConfig,
        rows: torch.Tensor,
        kwargs: dict,
        generating: bool = False,
    ) -> Any:
        n, batch = config.num_virtual_tokens, batch_size_of(kwargs)
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if cached_length(kwargs):  # a later step of an incremental decode: the prompt is in the cache already
            kwargs["attention_mask"] = with_ones_before(kwargs.get("attention_mask"), n, batch)
            return call(input_ids=input_ids, inputs_embeds=embeds, **kwargs)
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        seq = embeds.shape[1]
        prompts = rows[:n].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is None and generating:
            mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
        kwargs["attention_mask"] = with_ones_before(mask, n, batch)
        if getattr(self.model.config, "is_encoder_decoder", False):
            return call(**kwargs)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == seq:
            kwargs["labels"] = torch.cat(
                [torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels], 1
            )
        if (types := kwargs.get("token_type_ids")) is not None:  # virtual tokens belong to segment 0
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        if kwargs.get("position_ids") is not None:
            warnings.warn(
                "position_ids are ignored with prompt tuning / P-tuning (virtual tokens shift them)",
                stacklevel=3,
            )
            kwargs["position_ids"] = None
        if generating:  # transformers embeds the first step from inputs_embeds and continues from input_ids
            kwargs["input_ids"] = input_ids
        return call(**kwargs)
