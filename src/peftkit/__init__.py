"""peftkit: parameter-efficient fine-tuning for PyTorch / transformers, a drop-in for HF peft.

`import peftkit as peft` runs code written for HF peft and reads and writes the same adapter files.
"""

from . import helpers, optimizers  # noqa: F401  (peft.helpers, peft.optimizers)
from .config import PeftConfig, PeftType, TaskType
from .fast_attention import set_fast_attention
from .fused_loss import set_fused_causal_lm_loss
from .helpers import cast_mixed_precision_params
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
from .shared_prefix import set_shared_prefix
from .tuners.adalora import AdaLoraConfig, AdaLoraModel
from .tuners.boft import BOFTConfig, BOFTModel
from .tuners.ia3 import IA3Config, IA3Model
from .tuners.ln_tuning import LNTuningConfig, LNTuningModel
from .tuners.loha import LoHaConfig, LoHaModel
from .tuners.lokr import LoKrConfig, LoKrModel
from .tuners.lora import LoraConfig, LoraModel
from .tuners.lora_config import LoftQConfig
from .tuners.lora_loftq import replace_lora_weights_loftq
from .tuners.oft import OFTConfig, OFTModel
from .tuners.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from .tuners.prefix_tuning import PrefixTuningConfig
from .tuners.prompt_base import PromptLearningConfig
from .tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit
from .tuners.trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .tuners.vera import VeraConfig, VeraModel

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "BOFTConfig",
    "BOFTModel",
    "IA3Config",
    "IA3Model",
    "LNTuningConfig",
    "LNTuningModel",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "OFTConfig",
    "OFTModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "VeraConfig",
    "VeraModel",
    "cast_mixed_precision_params",
    "get_peft_model",
    "register_peft_method",
    "replace_lora_weights_loftq",
    "set_fast_attention",
    "set_fused_causal_lm_loss",
    "set_shared_prefix",
]
