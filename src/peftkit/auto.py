"""`AutoPeftModel*`: base model and adapter from one adapter folder.

The adapter's `adapter_config.json` names its base model (`base_model_name_or_path`, `revision`); the task
class picks the transformers Auto class to load it with, and the adapter is put on top with the matching
`PeftModel` class. A tokenizer saved in the adapter folder (e.g. with added chat tokens) sets the size of the
base model's embeddings, so an adapter trained after `resize_token_embeddings` loads.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from . import io
from .config import PeftConfig
from .peft_model import PeftModel
from .task_models import (  # TASK_MODELS from here: filled once the wrappers exist
    TASK_MODELS,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# Modules `AutoPeftModel` may import a base-model class from (`auto_mapping.parent_library` of an adapter saved
# without a task type); anything else needs `import_allowlist`, since the name comes from a downloaded file.
DEFAULT_IMPORT_ALLOWLIST = ("transformers", "diffusers")


class _BaseAutoPeftModel:
    """Loads base model + adapter; subclasses fix the transformers Auto class and the PeftModel class."""

    _target_class: type | None = None
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is not instantiated directly; use "
            f"{type(self).__name__}.from_pretrained(adapter_folder_or_hub_id)"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model the adapter in `pretrained_model_name_or_path` names, then the adapter.

        kwargs go to the base model's `from_pretrained` (e.g. `torch_dtype`, `device_map`) and to the
        adapter's (`subfolder`). `revision` is the adapter's; the base model's comes from the adapter config.

        Raises:
            ValueError: the adapter's task does not fit this class (the message names the class that fits),
                or the config does not say which base model to load.
        """
        path = os.fspath(pretrained_model_name_or_path)
        hub = {k: kwargs[k] for k in ("subfolder", "cache_dir", "token", "force_download") if k in kwargs}
        peft_config = PeftConfig.from_pretrained(path, revision=revision, **hub)
        if not peft_config.base_model_name_or_path:
            raise ValueError(
                f"{path}: adapter_config.json has no base_model_name_or_path, so {cls.__name__} does not know "
                "which base model to load; load it yourself and use PeftModel.from_pretrained(model, path)"
            )
        target_class = cls._base_model_class(peft_config, path, import_allowlist)
        base_kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder",)}
        base_model = target_class.from_pretrained(
            peft_config.base_model_name_or_path, revision=peft_config.revision, **base_kwargs
        )
        _resize_for_adapter_tokenizer(base_model, path, hub, kwargs.get("trust_remote_code", False))
        return cls._target_peft_class.from_pretrained(
            base_model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **hub
        )

    @classmethod
    def _base_model_class(cls, config: PeftConfig, path: str, import_allowlist: list[str] | None) -> Any:
        task = config.task_type
        if cls._target_class is None:
            if task is not None:
                expected = _AUTO_CLASS_FOR_TASK.get(task)
                hint = f" (for task_type={task!r}: {expected.__name__})" if expected else ""
                raise ValueError(
                    f"{path}: AutoPeftModel loads adapters without a task type; use the task's class{hint}"
                )
            return _class_from_auto_mapping(config, path, import_allowlist)
        expected_peft = TASK_MODELS.get(task)
        if task is not None and expected_peft is not None and expected_peft is not cls._target_peft_class:
            raise ValueError(
                f"{path}: the adapter's task_type is {task!r}, which loads as {expected_peft.__name__}, but "
                f"{cls.__name__} loads {cls._target_peft_class.__name__}; use "
                f"{_AUTO_CLASS_FOR_TASK[task].__name__}"
            )
        return cls._target_class


def _class_from_auto_mapping(config: PeftConfig, path: str, import_allowlist: list[str] | None) -> Any:
    mapping = config.auto_mapping or {}
    library, name = mapping.get("parent_library"), mapping.get("base_model_class")
    if not library or not name:
        return AutoModel  # HF peft falls back to the plain Auto class, too
    allowed = tuple(import_allowlist) if import_allowlist is not None else DEFAULT_IMPORT_ALLOWLIST
    if not any(library == a or library.startswith(a + ".") for a in allowed):
        raise ValueError(
            f"{path}: auto_mapping asks to import {name} from {library!r}, which is not in the import "
            f"allowlist {list(allowed)}; pass import_allowlist=[...] to allow it"
        )
    module = importlib.import_module(library)
    if not hasattr(module, name):
        raise ValueError(f"{path}: auto_mapping names {name!r}, which {library!r} does not define")
    return getattr(module, name)


def _resize_for_adapter_tokenizer(
    model: nn.Module, path: str, hub: dict[str, Any], trust_remote_code: bool
) -> None:
    """When the adapter folder carries a tokenizer, make the embedding rows match its length."""
    folder = os.path.join(path, hub["subfolder"]) if hub.get("subfolder") else path
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_NAME)):
            return
    else:
        try:
            io.resolve_adapter_file(path, TOKENIZER_CONFIG_NAME, **hub)
        except FileNotFoundError:
            return
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """Adapters saved without a task type: the base class comes from the config's `auto_mapping`."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = AutoModelForCausalLM
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = AutoModelForSeq2SeqLM
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = AutoModelForSequenceClassification
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = AutoModelForTokenClassification
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = AutoModelForQuestionAnswering
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = AutoModel
    _target_peft_class = PeftModelForFeatureExtraction


_AUTO_CLASS_FOR_TASK: dict[str, type[_BaseAutoPeftModel]] = {
    "CAUSAL_LM": AutoPeftModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoPeftModelForSeq2SeqLM,
    "SEQ_CLS": AutoPeftModelForSequenceClassification,
    "TOKEN_CLS": AutoPeftModelForTokenClassification,
    "QUESTION_ANS": AutoPeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": AutoPeftModelForFeatureExtraction,
}
