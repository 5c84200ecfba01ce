"""peftkit: parameter-efficient fine-tuning for PyTorch / transformers, a drop-in for HF peft.

`import peftkit as peft` runs code written for HF peft and reads and writes the same adapter files.
"""

from . import optimizers
from .config import PeftConfig, PeftType, TaskType
from .fused_loss import set_fused_causal_lm_loss
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .registry import register_peft_method
from .tuners.ia3 import IA3Config, IA3Model
from .tuners.adalora import AdaLoraConfig, AdaLoraModel
from .tuners.lora import LoraConfig, LoraModel

__version__ = "0.1.0"

__all__ = [
    "IA3Config",
    "IA3Model",
    "AdaLoraConfig",
    "AdaLoraModel",
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_peft_model",
    "register_peft_method",
    "set_fused_causal_lm_loss",
]
