"""peftkit: parameter-efficient fine-tuning for PyTorch / transformers, a drop-in for HF peft.

`import peftkit as peft` runs code written for HF peft and reads and writes the same adapter files.
"""

from . import (
    helpers,  # noqa: F401  (peft.helpers.rescale_adapter_scale, ...)
    optimizers,  # noqa: F401  (peft.optimizers.create_loraplus_optimizer, create_lorafa_optimizer)
    utils,  # noqa: F401  (peft.utils.*: integrations import from there)
)
from ._import_paths import install as _install_import_paths
from ._version import __version__ as __version__
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, PeftType, TaskType
from .errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from .fast_attention import set_fast_attention
from .fused_loss import set_fused_causal_lm_loss
from .helpers import cast_mixed_precision_params
from .inference_fold import drop_folds, set_inference_fold
from .kv_cache import set_growing_cache
from .low_level import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
)
from .mixed_model import PeftMixedModel
from .peft_model import PeftModel, get_peft_model
from .prompt_lookup import set_prompt_lookup
from .registry import register_peft_method
from .shared_prefix import set_shared_prefix
from .status import get_layer_status, get_model_status
from .task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .training_prep import prepare_model_for_kbit_training, shift_tokens_right
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

_install_import_paths()  # peftkit.tuners.lora.layer & co., see _import_paths.py

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
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
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "NoMatchingPeftModuleError",
    "OFTConfig",
    "OFTModel",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
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
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "cast_mixed_precision_params",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "register_peft_method",
    "set_base_model_state_dict",
    "replace_lora_weights_loftq",
    "set_fast_attention",
    "set_growing_cache",
    "set_inference_fold",
    "set_prompt_lookup",
    "drop_folds",
    "set_fused_causal_lm_loss",
    "set_peft_model_state_dict",
    "set_shared_prefix",
    "shift_tokens_right",
]
