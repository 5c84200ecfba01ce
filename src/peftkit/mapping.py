"""The lookup tables integrations import (`PEFT_TYPE_TO_CONFIG_MAPPING`, the default target modules per
architecture, ...) and `get_peft_config`.

Every table is derived from the registry (`registry.py`) and the target tables `inject.py` and the tuners
use, so a method registered or a default changed there shows up here without a second copy.
"""

from __future__ import annotations

from typing import Any

from . import tuners  # noqa: F401  (every method file registers itself: the tables below need them all)
from .config import PeftConfig, PeftType
from .inject import (
    ADALORA_DEFAULT_TARGETS,
    DEFAULT_TARGETS,
    IA3_DEFAULT_FEEDFORWARD,
    IA3_DEFAULT_TARGETS,
    LN_TUNING_DEFAULT_TARGETS,
)
from .peft_model import PeftModel
from .registry import all_methods
from .task_models import TASK_MODELS  # (filled by that module: the task wrappers)
from .tuners.loha import LoHaModel
from .tuners.lokr import LoKrModel
from .tuners.vera import VERA_DEFAULT_TARGETS


def _type_key(peft_type: str) -> str:
    # PeftType is a str enum, so `mapping["LORA"]` and `mapping[PeftType.LORA]` find the same entry; the
    # members are the keys where they exist because HF peft's tables are keyed by its PeftType.
    return PeftType(peft_type) if peft_type in PeftType._value2member_map_ else peft_type


PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, type[PeftConfig]] = {
    _type_key(name): method.config_cls for name, method in all_methods().items()
}
PEFT_TYPE_TO_TUNER_MAPPING: dict[str, type] = {
    _type_key(name): method.tuner_cls
    for name, method in all_methods().items()
    if method.tuner_cls is not None
}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[str, str] = {
    _type_key(name): method.prefix for name, method in all_methods().items()
}
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    task: cls for task, cls in TASK_MODELS.items() if task is not None
}

# Default `target_modules` per transformers `model_type`, per method (what `target_modules=None` means).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(DEFAULT_TARGETS)
TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(ADALORA_DEFAULT_TARGETS)
TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(DEFAULT_TARGETS)
TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(DEFAULT_TARGETS)
TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(LoHaModel.default_targets)
TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(LoKrModel.default_targets)
TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(VERA_DEFAULT_TARGETS)
TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(IA3_DEFAULT_TARGETS)
TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING: dict[str, list[str]] = dict(IA3_DEFAULT_FEEDFORWARD)
TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING: dict[str, list[str]] = dict(LN_TUNING_DEFAULT_TARGETS)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config object a dict describes, of the class its `peft_type` names.

    `config_dict` is what `adapter_config.json` holds (or any subset with `peft_type`); the same checks as
    loading a file apply (unknown keys warn, unsupported features raise, naming the key).
    """
    return PeftConfig.from_dict(dict(config_dict), source="get_peft_config(config_dict)")
