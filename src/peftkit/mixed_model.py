"""`PeftMixedModel`: adapters of different methods (LoRA, LoHa, LoKr, AdaLoRA, OFT) in one model, several active
at once (HF peft's class of that name; `get_peft_model(model, config, mixed=True)` returns one).

The layers nest (see `tuners/mixed.py`); the state-dict keys equal HF peft's (`base_model.model.<path>`, with
`base_layer.` levels where layers nest). Adapter files are the single-method files: `from_pretrained` /
`load_adapter` read what a one-method `PeftModel` (ours or HF peft's) wrote, and `save_pretrained` writes
each adapter as such a file (HF peft's mixed model cannot save; its `load_adapter` reads ours).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import io
from .adapter_loading import LoadResult
from .config import PeftConfig
from .peft_model import PeftModel
from .tuners.mixed import MixedModel, check_mixable, file_key_map


class PeftMixedModel(nn.Module):
    """A model with adapters of several methods.

    Attributes:
        base_model: the `MixedModel` tuner (`base_model.model` is the wrapped model).
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        check_mixable(peft_config)
        self.config = getattr(model, "config", {"model_type": "custom"})
        self.modules_to_save = None
        self.base_model = MixedModel(model, _with_base_name(model, peft_config), adapter_name, init_weights)
        self.base_model.place_adapter(adapter_name)
        if hasattr(model, "enable_input_require_grads") and getattr(
            model, "is_gradient_checkpointing", False
        ):
            model.enable_input_require_grads()

    # ----- delegation --------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # (trainable, all) parameter counts and their printout, exactly as a PeftModel gives them
    get_nb_trainable_parameters = PeftModel.get_nb_trainable_parameters
    print_trainable_parameters = PeftModel.print_trainable_parameters

    # ----- adapters ----------------------------------------------------------------------------------------
    def _check_names(self, names: list[str]) -> None:
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(
                f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}"
            )

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        init_weights: bool = True,
    ) -> None:
        """Add an adapter of any mixable method (not activated: call `set_adapter`)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists.")
        init_weights = init_weights and not low_cpu_mem_usage
        config = _with_base_name(self.get_base_model(), peft_config)
        self.base_model.inject_adapter(config, adapter_name, init_weights=init_weights)
        self.base_model.place_adapter(adapter_name, autocast_adapter_dtype, on_meta=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate these adapters together (their order in the forward is the order they were added, as in
        HF peft); they are trainable unless `inference_mode`."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        self.base_model.set_adapter(names)
        if inference_mode:
            self.base_model.set_requires_grad(names, False)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        for name in names:
            self.base_model.delete_adapter(name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model (every adapter off) inside the block."""
        with self.base_model.adapters_disabled():
            yield

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold the active (or given) adapters into the weights; returns the plain model."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def get_layer_status(self) -> Any:
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self) -> Any:
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    # ----- files -------------------------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """One adapter's tensors under the file keys of a one-method adapter file."""
        self._check_names([adapter_name])
        state = self.state_dict()
        return {disk: state[mem] for mem, disk in file_key_map(self, adapter_name).items()}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as a one-method adapter folder (`adapter_config.json` + weights; non-default names
        in a sub-folder of that name), readable by `PeftModel.from_pretrained` and by this class."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained: {save_directory} is a file; expected a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_names(names)
        for name in names:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            weights = io.SAFETENSORS_WEIGHTS_NAME if safe_serialization else io.WEIGHTS_NAME
            tensors = io.tensors_to_bytes(self.get_adapter_state_dict(name), safe_serialization)
            io.save_adapter_files(folder, config.to_json_bytes(), tensors, weights)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> LoadResult:
        """Add the adapter saved in `model_id` (a one-method adapter folder) as `adapter_name` (not activated);
        the file's shapes are checked module by module."""
        from .adapter_loading import copy_adapter_tensors

        config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        weights_path = io.find_weights_file(model_id, kwargs.get("subfolder"))
        tensors = io.load_weights_file(weights_path)
        active = self.active_adapters
        self.add_adapter(adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype, init_weights=False)
        self.base_model.place_adapter(adapter_name, autocast_adapter_dtype)
        result = copy_adapter_tensors(
            self, tensors, adapter_name, weights_path, key_map=file_key_map(self, adapter_name)
        )
        self.set_adapter([n for n in active if n in self.peft_config])
        if not is_trainable:  # as HF peft: the new adapter's dropout must not run at inference
            self.eval()
        return result

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftMixedModel:
        """Wrap `model` with the adapter saved in `model_id`; add more with `load_adapter`."""
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        mixed = cls(model, config, adapter_name, init_weights=False)
        weights_path = io.find_weights_file(model_id, kwargs.get("subfolder"))
        from .adapter_loading import copy_adapter_tensors

        copy_adapter_tensors(
            mixed,
            io.load_weights_file(weights_path),
            adapter_name,
            weights_path,
            key_map=file_key_map(mixed, adapter_name),
        )
        mixed.set_adapter(adapter_name, inference_mode=not is_trainable)
        if not is_trainable:
            mixed.eval()
        return mixed


def _with_base_name(model: nn.Module, config: PeftConfig) -> PeftConfig:
    """`config` with `base_model_name_or_path` filled from the model, as `get_peft_model` records it."""
    if config.base_model_name_or_path is not None:
        return config
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return dataclasses.replace(config, base_model_name_or_path=name) if name else config
