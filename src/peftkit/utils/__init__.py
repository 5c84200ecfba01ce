"""`peftkit.utils`: the names integrations import from `peft.utils` (transformers, diffusers, TRL), as aliases
of peftkit's own objects. Nothing inside the library imports this package; it only re-exports."""

from ..errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from . import constants
from .constants import *  # noqa: F403  (its __all__: file names and the default-target tables)
from .other import (
    ModulesToSaveWrapper,
    _get_submodules,
    infer_device,
    prepare_model_for_kbit_training,
    shift_tokens_right,
    transpose,
)
from .peft_types import PeftType, TaskType, register_peft_method
from .save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__all__ = [
    *constants.__all__,
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "_get_submodules",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "infer_device",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "register_peft_method",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
    "transpose",
]
