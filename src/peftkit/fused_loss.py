"""When and how `PeftModelForCausalLM.forward` takes the loss without materialising logits.

While training (module in train mode, grad enabled) with `labels`, a standard transformers causal LM is
run as its decoder body plus `functional.lm_loss.causal_lm_loss`: the LM head and cross-entropy are computed
only at labelled positions, chunk by chunk. The loss (and every gradient) equals the plain computation; the
output has `logits=None`. In eval mode, without labels, or for anything unusual (a model class not listed
here, an adapted or wrapped head, logits_to_keep, extra outputs asked for) the plain path runs.

Turn it off for every model with `peftkit.set_fused_causal_lm_loss(False)`, or for one model by setting
`model.fused_causal_lm_loss = False`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from .functional.lm_loss import causal_lm_loss
from .hf_compat import CACHE_KEY
from .shared_prefix import prefix_length, run_with_shared_prefix

# Classes whose forward is exactly `body -> lm_head(hidden) -> ForCausalLMLoss` (checked in transformers 5).
STANDARD_CAUSAL_LMS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "GemmaForCausalLM",
        "Olmo2ForCausalLM",
        "GPT2LMHeadModel",
    }
)
_HEAD_ONLY_KWARGS = ("logits_to_keep", "shift_labels", "output_attentions", "output_hidden_states")
_enabled = True


def set_fused_causal_lm_loss(enabled: bool) -> None:
    """Switch the fused causal-LM loss on (default) or off for every model."""
    global _enabled
    _enabled = bool(enabled)


def fused_causal_lm_loss_enabled() -> bool:
    return _enabled


def _switched_on(model: nn.Module) -> bool:
    """Both switches: `set_fused_causal_lm_loss` and the model's `fused_causal_lm_loss` attribute."""
    return _enabled and getattr(model, "fused_causal_lm_loss", True)


def _body_and_head(base: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder body and plain Linear head of a standard causal LM, or None if it is not one."""
    cls = type(base)
    if cls.__name__ not in STANDARD_CAUSAL_LMS or not cls.__module__.startswith("transformers.models."):
        return None
    if getattr(base, "loss_function", None) is not ForCausalLMLoss:
        return None
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head = base.get_output_embeddings()
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or not isinstance(body, nn.Module):  # an adapted/wrapped head: plain path
        return None
    return body, head


def _asks_for_more(kwargs: dict[str, Any]) -> bool:
    """True if the caller wants something only the plain path returns (attentions, hidden states, a
    logits slice) or passes its own shifted labels."""
    keep = kwargs.get("logits_to_keep", 0)
    return (
        bool(kwargs.get("output_attentions"))
        or bool(kwargs.get("output_hidden_states"))
        or kwargs.get("shift_labels") is not None
        or torch.is_tensor(keep)
        or keep != 0
    )


def _tuner_is_passthrough(model: nn.Module) -> bool:
    """True when the method's tuner forward just calls the model: a tuner that adds to the loss (AdaLoRA's
    orthogonality penalty) or changes the inputs (prompt learning) needs the plain path."""
    from .tuners.base import BaseTuner

    tuner = getattr(model, "base_model", None)
    return isinstance(tuner, BaseTuner) and type(tuner).forward is BaseTuner.forward


def try_fused_forward(
    model: nn.Module,
    base: nn.Module,
    labels: torch.Tensor | None,
    return_dict: bool | None,
    body_kwargs: dict[str, Any],
) -> CausalLMOutputWithPast | None:
    """The fused training forward of `base` (inside PeftModel `model`), or None when the plain path must run.

    body_kwargs: input_ids / attention_mask / inputs_embeds and the caller's extra kwargs (not modified).
    """
    if labels is None or not _switched_on(model):
        return None
    if not (model.training and torch.is_grad_enabled()) or return_dict is False:
        return None
    if _asks_for_more(body_kwargs) or not _tuner_is_passthrough(model):
        return None
    return fused_loss_forward(model, base, labels, body_kwargs)


def fused_loss_forward(
    model: nn.Module, base: nn.Module, labels: torch.Tensor, body_kwargs: dict[str, Any]
) -> CausalLMOutputWithPast | None:
    """Decoder body (with a shared prefix run once, see `shared_prefix`) + the chunked loss, in whatever mode
    the model is in; None if `base` is not a standard causal LM. Callers decide when logits=None is fine."""
    parts = _body_and_head(base)
    if parts is None:
        return None
    body, head = parts
    kwargs = {k: v for k, v in body_kwargs.items() if k not in _HEAD_ONLY_KWARGS and v is not None}
    num_items = kwargs.pop("num_items_in_batch", None)
    shared = prefix_length(model, body, kwargs, labels)
    ran = run_with_shared_prefix(body, kwargs, shared, labels) if shared else None  # only the loss is kept
    if ran is None:
        out = body(**kwargs)
        hidden, cache = out.last_hidden_state, getattr(out, CACHE_KEY, None)
    else:  # the suffix's hidden states; the label at the first suffix position is -100 (see shared_prefix)
        (hidden, positions), cache = ran, None
        labels = labels[:, positions]
    loss = causal_lm_loss(hidden, head.weight, labels, head.bias, num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, **{CACHE_KEY: cache})


def loss_only(model: nn.Module, batch: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor | None:
    """The causal-LM loss of a peftkit PeftModel or plain transformers causal LM on `batch` (input_ids, attention_mask, labels: (batch, seq))
    without the (batch, seq, vocab) logits, in any mode (held-out evaluation); equal to `model(**batch).loss`.
    None when the fused path cannot run (another library's model, a non-standard LM, prompt learning...):
    the caller then takes the plain forward."""
    if not _switched_on(model):
        return None
    if _body_and_head(model) is not None:  # a plain transformers causal LM (e.g. the base before training)
        base = model
    elif _tuner_is_passthrough(model):
        base = model.get_base_model()
    else:
        return None
    body_kwargs = {k: v for k, v in batch.items() if k != "labels"}
    if num_items_in_batch is not None:
        body_kwargs["num_items_in_batch"] = num_items_in_batch
    out = fused_loss_forward(model, base, batch["labels"], body_kwargs)
    return None if out is None else out.loss
