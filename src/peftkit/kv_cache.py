"""A KV cache that grows into spare room instead of concatenating: `generate` without copying the cache per token.

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, which copies the whole
cache of that layer: per decode step 2 x layers copies of (batch, kv_heads, length, head_dim), so generating
n tokens copies O(n * length) numbers per layer (15% of the CPU time of a batch-32 SmolLM2 generate, more
than the attention itself). `GrowingLayer` keeps keys and values in a buffer with room after the filled part
and writes each step's states into that room; `keys`/`values` are views of the filled part (strided along
the sequence, which attention reads as it is). When the room runs out, the buffer is reallocated with half
its length again to spare, so copies happen O(log n) times.

Anything that replaces `keys`/`values` from outside (beam reordering, `crop`, `batch_select_indices`, the
shared-prefix broadcast) is noticed on the next update (the views are no longer the ones handed out) and the
buffer is rebuilt from the new tensors, so every `DynamicLayer` operation keeps its meaning.

`growing_cache(model)` gives an empty `DynamicCache` whose layers are `GrowingLayer`s (None for a model whose
cache is not made of plain full-attention layers: sliding windows, linear attention, encoder-decoder);
`make_growing(cache)` converts a filled one in place. `PeftModel.generate` passes one to `generate` when the
caller did not pass a cache of their own; `peftkit.set_growing_cache(False)` switches that off.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .generate_settings import prompt_learning, settings

_enabled = True


def set_growing_cache(enabled: bool) -> None:
    """Switch the growing KV cache in `PeftModel.generate` on (default) or off for every model."""
    global _enabled
    _enabled = bool(enabled)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values (batch, kv_heads, length, head_dim) are views of a longer buffer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._kbuf: torch.Tensor | None = None  # (batch, kv_heads, room, head_dim)
        self._vbuf: torch.Tensor | None = None
        self._kview: torch.Tensor | None = None  # the views handed out last as keys / values
        self._vview: torch.Tensor | None = None

    def _owns_views(self) -> bool:
        """Whether keys/values are still the views of the buffer this layer handed out last."""
        return self._kbuf is not None and self.keys is self._kview and self.values is self._vview

    def _rebuild(self, length: int, incoming: torch.Tensor, incoming_v: torch.Tensor) -> None:
        """New buffers with room for `length` positions (and half as many again), holding the current states."""
        have = self.get_seq_length()
        room = length + max(64, length // 2)
        batch, heads, _, dim = incoming.shape
        self._kbuf = incoming.new_empty(batch, heads, room, dim)
        self._vbuf = incoming_v.new_empty(batch, incoming_v.shape[1], room, incoming_v.shape[-1])
        if have:
            self._kbuf[..., :have, :].copy_(self.keys)
            self._vbuf[..., :have, :].copy_(self.values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key_states/value_states (batch, kv_heads, new, head_dim); return the whole cache as views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        have = self.get_seq_length()
        length = have + key_states.shape[-2]
        if have and (
            self.keys.shape[:2] != key_states.shape[:2]
            or self.keys.dtype != key_states.dtype
            or self.values.shape[:2] != value_states.shape[:2]
        ):  # not a shape this layer can extend: what DynamicLayer does (cat raises the same error)
            return super().update(key_states, value_states, *args, **kwargs)
        if not (
            self._owns_views()
            and self._kbuf.shape[-2] >= length
            and self._kbuf.shape[0] == key_states.shape[0]
        ):
            self._rebuild(length, key_states, value_states)
        self._kbuf[..., have:length, :].copy_(key_states)
        self._vbuf[..., have:length, :].copy_(value_states)
        self.keys = self._kview = self._kbuf[..., :length, :]
        self.values = self._vview = self._vbuf[..., :length, :]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (assisted decoding after rejected candidates): the views
        shrink, the buffer keeps its room, nothing is copied."""
        if tokens_to_remove < 0 and self._owns_views():
            length = max(self.get_seq_length() + tokens_to_remove, 0)
            self.keys = self._kview = self._kbuf[..., :length, :]
            self.values = self._vview = self._vbuf[..., :length, :]
            return
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = self._kview = self._vview = None


def _plain_layers(config: Any) -> bool:
    """Whether the model's decoder cache is all plain full-attention `DynamicLayer`s."""
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # an older transformers or a config it cannot read: keep transformers' own cache
        return False
    return all(DYNAMIC_LAYER_TYPE_MAPPING.get(t) is DynamicLayer for t in types)


def growing_cache(model: Any) -> DynamicCache | None:
    """An empty `DynamicCache` of `GrowingLayer`s for `model` (a transformers model), or None when its cache
    is not made of plain full-attention layers."""
    if not _enabled or not _plain_layers(getattr(model, "config", None)):
        return None
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def make_growing(cache: Any) -> Any:
    """Turn every plain `DynamicLayer` of a filled `cache` into a `GrowingLayer` holding the same states."""
    if not _enabled:
        return cache
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            grown = GrowingLayer()
            grown.__dict__.update(layer.__dict__)  # keys, values, device: the buffers come at the next update
            layers[i] = grown
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


_NOT_WITH = ("past_key_values", "cache", "cache_implementation")


def offer(model: Any, kwargs: dict[str, Any], cache_key: str) -> dict[str, Any]:
    """The caller's `generate` keywords with a `growing_cache` of `model` (a PeftModel) under `cache_key`,
    unless the caller brought a cache or cache setting, turned the cache off, runs beams, or the adapter is
    prompt learning (which hands over a cache of its own). Assisted decoding (prompt lookup) crops it in place."""
    if prompt_learning(model) or any(kwargs.get(k) is not None for k in _NOT_WITH):
        return kwargs
    setting = settings(model, kwargs)
    if (
        (setting("num_beams", 1) or 1) != 1
        or setting("cache_implementation", None) is not None
        or setting("use_cache", True) is False
    ):
        return kwargs
    cache = growing_cache(model.get_base_model())
    return kwargs if cache is None else {**kwargs, cache_key: cache}
