"""The task wrappers of `PeftModel`: causal LM, seq2seq LM, sequence/token classification, question answering
and feature extraction (`task_type` picks one; see `TASK_MODELS`).

Each wrapper only shapes `forward` for its task (labels, decoder inputs, prompt-learning tokens); adapters,
saving and loading are `PeftModel`'s. Their `__module__` stays `peftkit.peft_model`, where they were defined
before, so class names in pickles and in `repr` are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from . import integrations
from .fast_attention import fast_attention
from .fused_loss import try_fused_forward
from .peft_model import TASK_MODELS, PeftModel


class PeftModelForCausalLM(PeftModel):
    """Causal LM: `forward(input_ids, attention_mask, labels, ...)` and `generate`."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """input_ids: (batch, seq); labels: (batch, seq) with -100 where no loss is taken.

        Training with labels (train mode, grad enabled) on a standard transformers causal LM takes the loss
        without materialising the (batch, seq, vocab) logits and returns `logits=None`; the loss and its
        gradients equal the plain path's. See `peftkit.fused_loss` (and `set_fused_causal_lm_loss`).
        Training forwards also run transformers' "sdpa" attention as a blocked causal kernel on CPU; see
        `peftkit.fast_attention` (and `set_fast_attention`).
        """
        integrations.check_wrapper_kwargs(self, task_ids, kwargs)
        extra = {
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
            **kwargs,
        }
        body_kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "inputs_embeds": inputs_embeds,
        }
        with fast_attention(self, self.get_base_model()):
            # TRL's fused LM head (patched onto the base model's forward) computes its own loss
            fused = None
            if "fused_lm_head" not in kwargs:
                fused = try_fused_forward(
                    self, self.get_base_model(), labels, return_dict, {**body_kwargs, **extra}
                )
            if fused is not None:
                return fused
            return self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                **kwargs,
            )

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    """Encoder-decoder LM (T5, BART): forward passes decoder inputs through; `generate` works."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        integrations.check_wrapper_kwargs(self, task_ids, kwargs)
        return self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )


class _EncoderTaskModel(PeftModel):
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        integrations.check_wrapper_kwargs(self, task_ids, kwargs)
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )


class PeftModelForSequenceClassification(_EncoderTaskModel):
    """Sequence classification: the head (`classifier` / `score`) is trained and saved with the adapter."""

    classifier_module_names = ("classifier", "score")


class PeftModelForTokenClassification(_EncoderTaskModel):
    """Token classification: the head is trained and saved with the adapter."""

    classifier_module_names = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA: the span head `qa_outputs` is trained and saved with the adapter."""

    classifier_module_names = ("qa_outputs",)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        integrations.check_wrapper_kwargs(self, kwargs.pop("task_ids", None), kwargs)
        return self.base_model(*args, **kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    """Embeddings / hidden states (no head)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        integrations.check_wrapper_kwargs(self, task_ids, kwargs)
        return self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )


TASK_MODELS.update(
    {
        "CAUSAL_LM": PeftModelForCausalLM,
        "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
        "SEQ_CLS": PeftModelForSequenceClassification,
        "TOKEN_CLS": PeftModelForTokenClassification,
        "QUESTION_ANS": PeftModelForQuestionAnswering,
        "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
    }
)

for _cls in (
    PeftModelForCausalLM,
    PeftModelForSeq2SeqLM,
    _EncoderTaskModel,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    PeftModelForQuestionAnswering,
    PeftModelForFeatureExtraction,
):
    _cls.__module__ = "peftkit.peft_model"
