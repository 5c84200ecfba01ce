"""`PeftModel`: a base model plus named adapters (the task wrappers are in `task_models.py`).

`PeftModel` subclasses transformers' `PreTrainedModel` only so that a plain `transformers.Trainer`
recognises it and calls our `save_pretrained` for checkpoints (an unrecognised class gets its whole
`state_dict()` written, hundreds of MB, and fails on tied weights). Nothing of `PreTrainedModel.__init__`
runs: the wrapper keeps no config of its own and never touches the base model's.

transformers, TRL and accelerate inspect the *base* model of an HF peft model (its forward signature, class,
class name); a peftkit model answers those questions the same way: see `peftkit.integrations`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from . import integrations, io, kv_cache, merge, mixed_batch, prompt_lookup
from .config import CONFIG_NAME, PeftConfig
from .generate_prefix import generate_with_shared_prefix
from .head_input import contiguous_head_input
from .hf_compat import CACHE_KEY
from .inference_fold import drop_folds, generating
from .modules_to_save import ModulesToSaveWrapper
from .registry import get_method
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .tuners.switching import has_active_enabled_adapter, set_requires_grad

TRAINER_CHECKPOINT_PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
RESUME_INDEX_NAME = "model.safetensors.index.json"  # what earlier peftkit wrote into Trainer checkpoints
TRAINER_MODEL_FILE = "model.safetensors"  # transformers.utils.SAFE_WEIGHTS_NAME: what Trainer reloads


class PeftModel(PreTrainedModel):
    """A model with adapters. `base_model` is the method's tuner; `get_base_model()` the wrapped model.

    Attributes:
        modules_to_save: names of modules trained in full and saved with the adapter (or None).
    """

    classifier_module_names: tuple[str, ...] = ()

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> PeftModel:
        """An instance of `cls` specialised to `type(model)`: its `forward` shows the base model's signature
        (see `peftkit.integrations.specialise`). Without a model (copy, unpickling) `cls` is used as is."""
        if model is not None and isinstance(model, nn.Module):
            cls = integrations.specialise(integrations.unspecialised(cls), type(model))
        return nn.Module.__new__(cls)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle (and copy) by the wrapper and base classes: the specialised class is rebuilt on load."""
        base_cls = type(self).__dict__.get("_peftkit_base_class")
        if base_cls is None:
            return super().__reduce_ex__(protocol)
        wrapper = integrations.unspecialised(type(self))
        return integrations.new_specialised, (wrapper, base_cls), self.__getstate__()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        init_weights: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        self.config = getattr(model, "config", {"model_type": "custom"})
        self.modules_to_save: set[str] | None = None
        method = get_method(peft_config.peft_type)
        if method.tuner_cls is None:
            raise NotImplementedError(f"{method.peft_type} is not implemented in peftkit yet")
        peft_config = self._prepare_config(model, peft_config)
        # meta tensors hold no values, so initialising them would be wasted work (and PiSSA would rewrite the base)
        init_weights = init_weights and not low_cpu_mem_usage
        tuner = method.tuner_cls(model, peft_config, adapter_name, init_weights=init_weights)
        tuner.place_adapter(adapter_name, autocast_adapter_dtype, on_meta=low_cpu_mem_usage)
        if method.is_prompt_learning:  # HF peft's layout: `base_model.*` is the model, `prompt_encoder.*` the
            # encoders; the tuner that runs them is held unregistered (`self.base_model` still returns it)
            self.__dict__["_prompt_tuner"] = tuner
            self._modules["base_model"] = model
            self._modules["prompt_encoder"] = tuner.prompt_encoder
            self._modules["word_embeddings"] = model.get_input_embeddings()
        else:
            self.base_model = tuner
        self._wrap_modules_to_save(self.peft_config[adapter_name], adapter_name)

    # ----- identity and delegation -------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and integrations.redirect_forward_patch(self, value):
            return  # a patch meant for the transformers model (TRL's fused LM head) went to the base model
        super().__setattr__(name, value)

    def _get_name(self) -> str:
        """The base model's class name: transformers decides from it (as it does from an HF peft model's
        base) whether label smoothing shifts the labels. `repr` still shows the wrapper's name."""
        base = self._modules.get("base_model")
        model = getattr(base, "model", None) if base is not None else None
        return model._get_name() if isinstance(model, nn.Module) else type(self).__name__

    def __repr__(self) -> str:
        text = super().__repr__()
        return type(self).__name__ + text[len(self._get_name()) :]

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """True: adapters are attached. transformers reads this flag (`validate_quantization_for_training`) to
        tell a quantized model with trainable adapters (QLoRA) from a purely quantized one, which it refuses."""
        return True

    def can_generate(self) -> bool:  # a classmethod on PreTrainedModel; pipelines ask the instance
        can = getattr(self.get_base_model(), "can_generate", None)
        return bool(can()) if callable(can) else False

    @property
    def base_model(self) -> nn.Module:  # PreTrainedModel defines a property of that name; ours is the tuner
        return self.__dict__.get("_prompt_tuner") or self._modules["base_model"]

    @base_model.setter
    def base_model(self, value: nn.Module) -> None:
        self._modules["base_model"] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules"):
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0]

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def peft_type(self) -> str:
        return self.peft_config[self.active_adapter].peft_type

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return getattr(self.get_base_model(), "supports_gradient_checkpointing", False)

    @property
    def main_input_name(self) -> str:
        return getattr(self.get_base_model(), "main_input_name", "input_ids")

    @property
    def _no_split_modules(self) -> Any:
        return getattr(self.get_base_model(), "_no_split_modules", None)

    def train(self, mode: bool = True) -> PeftModel:
        super().train(mode)
        if mode:  # training resumes: free the no-grad folded LoRA weights (see inference_fold)
            drop_folds(self)
        if "_prompt_tuner" in self.__dict__:  # not a registered child (see __init__): keep its flag in step
            self.__dict__["_prompt_tuner"].training = mode
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers inside it)."""
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with mixed_batch.from_kwargs(self, args, kwargs):
            return self.base_model(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`adapter_names` (one per row, `"__base__"` for none) runs a mixed-adapter batch: see `mixed_batch`."""
        with mixed_batch.from_kwargs(self, args, kwargs):
            return super().__call__(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The tuner's generate: the base model's, except where a method changes it (prompt learning).
        `adapter_names` (one per prompt) generates each row with its own adapter: see `mixed_batch`."""
        if kwargs.get("adapter_names") is not None:
            kwargs = kv_cache.offer(self, kwargs, CACHE_KEY)
            with contiguous_head_input(self):
                return mixed_batch.generate(self, self.base_model.generate, args, kwargs)
        kwargs.pop("adapter_names", None)
        # LoRA Linear layers may run folded (inference_fold); the head's prefill input is made contiguous
        with generating(), contiguous_head_input(self):
            out = None if args else generate_with_shared_prefix(self, self.base_model.generate, kwargs)
            if out is not None:
                return out
            kwargs = kv_cache.offer(self, prompt_lookup.offer(self, args, kwargs), CACHE_KEY)
            return self.base_model.generate(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.get_base_model().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        getter = getattr(self.get_base_model(), "get_output_embeddings", None)
        return getter() if getter else None

    def tie_weights(self, *args: Any, **kwargs: Any) -> Any:
        tie = getattr(self.get_base_model(), "tie_weights", None)
        return tie(*args, **kwargs) if tie else None

    def enable_input_require_grads(self) -> None:
        self.get_base_model().enable_input_require_grads()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Checkpoint the base model's blocks. With frozen embeddings, the first block's input would not
        require grad and reentrant checkpointing would drop every gradient, so the embedding output is made
        to require grad.

        `kwargs` (transformers 5: `every_n_layers`, `offload`) are passed on: `Trainer` reaches this override
        through `PreTrainedModel.activation_checkpointing_enable`, which forwards them."""
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5; the old name is deprecated
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs
            )
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs
            )
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    # ----- parameters ------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), shared tensors counted once."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):
                n = p.ds_numel
            if p.__class__.__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
                n *= 2
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print `trainable params: N || all params: M || trainable%: P`, exactly as HF peft does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ----- adapters ----------------------------------------------------------------------------------------
    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """A copy of `config` with the task's heads in modules_to_save and the base model's name recorded."""
        changes: dict[str, Any] = {}
        if config.base_model_name_or_path is None:
            name = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(
                model, "name_or_path", None
            )
            if name:
                changes["base_model_name_or_path"] = name
        if self.classifier_module_names and hasattr(config, "modules_to_save"):
            current = list(config.modules_to_save or [])
            changes["modules_to_save"] = current + [
                n for n in self.classifier_module_names if n not in current
            ]
        return dataclasses.replace(config, **changes) if changes else config

    def _wrap_modules_to_save(self, config: PeftConfig, adapter_name: str) -> None:
        names = getattr(config, "modules_to_save", None)
        if not names:
            return
        self.modules_to_save = set(self.modules_to_save or ()) | set(names)
        model = self.get_base_model()
        for key, module in list(model.named_modules()):
            if ".modules_to_save." in f".{key}." or ".original_module" in f".{key}.":
                continue
            if not any(key == n or key.endswith("." + n) for n in names):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                parent_key, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_key) if parent_key else model
                setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
        self._set_modules_to_save_adapter(self.active_adapter)

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        for module in self.get_base_model().modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield module

    def _set_modules_to_save_adapter(self, adapter_name: str) -> None:
        trainable = (
            not self.peft_config[adapter_name].inference_mode if adapter_name in self.peft_config else False
        )
        for wrapper in self._wrappers():
            wrapper.set_adapter(adapter_name, trainable=trainable)

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        init_weights: bool = True,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter (not activated: call `set_adapter` to use it). `low_cpu_mem_usage` and
        `autocast_adapter_dtype` as in `get_peft_model` (see `tuners/placement.py`)."""
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"Cannot add a {peft_config.peft_type} adapter to a {self.peft_type} model; "
                "one PeftModel holds adapters of one method"
            )
        peft_config = self._prepare_config(self.get_base_model(), peft_config)
        init_weights = init_weights and not low_cpu_mem_usage
        self.base_model.inject_adapter(peft_config, adapter_name, init_weights=init_weights)
        self.base_model.place_adapter(adapter_name, autocast_adapter_dtype, on_meta=low_cpu_mem_usage)
        self._wrap_modules_to_save(peft_config, adapter_name)

    def _check_adapter_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            known = ", ".join(repr(n) for n in self.peft_config) or "none"
            raise ValueError(f"Adapter {adapter_name!r} does not exist; known adapters: {known}")

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active (and, unless inference-only, the trainable) adapter."""
        self._check_adapter_name(adapter_name)
        self.base_model.set_adapter(adapter_name)
        self._set_modules_to_save_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter's tensors and config."""
        self._check_adapter_name(adapter_name)
        self.base_model.delete_adapter(adapter_name)
        for wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        if self.peft_config and adapter_name == self.active_adapter:
            self.set_adapter(next(iter(self.peft_config)))

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        generator: torch.Generator | None = None,
    ) -> None:
        """Add `adapter_name`, a weighted combination of existing LoRA (or IA3) adapters; see `peftkit.merge`."""
        merge.add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
            generator=generator,
        )

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model computes exactly what the base model computes."""
        wrappers = list(self._wrappers())
        for w in wrappers:
            w.disable_adapters = True
        try:
            with self.base_model.adapters_disabled():
                yield
        finally:
            for w in wrappers:
                w.disable_adapters = False

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def _replace_wrappers(self) -> None:
        model = self.get_base_model()
        for key, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent_key, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_key) if parent_key else model
                setattr(parent, child, module.active_module)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold the adapters into the weights and return the plain base model (heads: the trained copies)."""
        model = self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
        self._replace_wrappers()
        return model

    def unload(self) -> nn.Module:
        """Remove all adapters without merging; returns the original base model."""
        for w in self._wrappers():
            w.disable_adapters = True
        self._replace_wrappers()
        return self.base_model.unload()

    # ----- files -------------------------------------------------------------------------------------------
    def get_adapter_state_dict(
        self,
        adapter_name: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_embedding_layers: str | bool = "auto",
    ) -> dict[str, torch.Tensor]:
        """The tensors of one adapter under HF peft's file keys."""
        name = adapter_name or self.active_adapter
        self._check_adapter_name(name)
        source = self.state_dict() if state_dict is None else state_dict
        keys = io.adapter_key_map(self, name)
        out = {disk: source[mem] for mem, disk in keys.items()}
        out.update({k: source[k] for k in self._extra_saved_keys(name, source, save_embedding_layers)})
        return self.base_model.tensors_for_saving(name, out)

    def _extra_saved_keys(
        self, adapter_name: str, source: dict[str, torch.Tensor], save_embedding_layers: str | bool
    ) -> list[str]:
        """Non-adapter tensors HF peft also saves: trained biases, and base embeddings when they are targets."""
        config = self.peft_config[adapter_name]
        extra = []
        bias = getattr(config, "bias", "none")
        if bias == "all":
            extra += [
                k
                for k in source
                if k.endswith("bias") and ".modules_to_save." not in k and ".original_module." not in k
            ]
        elif bias.endswith("_only"):  # lora_only, vera_only, oft_only, ...: the adapted layers' biases
            extra += [
                f"{path}.base_layer.bias"
                for path, layer in self._adapter_layer_items()
                if adapter_name in layer.adapter_names and f"{path}.base_layer.bias" in source
            ]
        targets = getattr(config, "target_modules", None) or []
        embed_names = ("embed_tokens", "lm_head")
        in_targets = not isinstance(targets, str) and any(t in embed_names for t in targets)
        if save_embedding_layers is True or (save_embedding_layers == "auto" and in_targets):
            extra += self._embedding_keys(source, in_targets)
        return extra

    def _embedding_keys(self, source: dict[str, torch.Tensor], in_targets: bool) -> list[str]:
        """The base input/output embedding tensors HF peft saves with `save_embedding_layers`: of the adapted
        embedding layers when embeddings are targets, else of the plain ones (`embed_tokens`, `lm_head`)."""
        from .tuners.base import AdapterLayer

        base = self.get_base_model()
        paths = {id(m): p for p, m in self.named_modules()}
        keys: list[str] = []
        for get in ("get_input_embeddings", "get_output_embeddings"):
            layer = getattr(base, get, lambda: None)()
            if layer is None or id(layer) not in paths or isinstance(layer, AdapterLayer) != in_targets:
                continue
            prefix = f"{paths[id(layer)]}.base_layer." if in_targets else f"{paths[id(layer)]}."
            keys += [k for k in source if k.startswith(prefix) and k not in keys]
        return keys

    def _adapter_layer_items(self) -> Iterator[tuple[str, nn.Module]]:
        from .tuners.base import AdapterLayer

        for path, module in self.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as `adapter_config.json` + `adapter_model.safetensors` (non-default names in a
        sub-folder of that name), and a `README.md` model card (a user's README is updated, not replaced).

        Each adapter's two files are replaced as one unit (`io.save_adapter_files`): a crash leaves the old
        pair or the new one, never new weights beside an old config. Other files in the folder are kept."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained: {save_directory} is a file; expected a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter_name(name)
        if not is_main_process:
            return
        for name in names:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            tensors = self.get_adapter_state_dict(name, state_dict, save_embedding_layers)
            weights = io.SAFETENSORS_WEIGHTS_NAME if safe_serialization else io.WEIGHTS_NAME
            config_json = self._config_for_saving(name).to_json_bytes()
            io.save_adapter_files(
                folder, config_json, io.tensors_to_bytes(tensors, safe_serialization), weights
            )
        self._write_model_card(save_directory, names)
        if os.path.basename(os.path.normpath(save_directory)).startswith(TRAINER_CHECKPOINT_PREFIX):
            self._write_resume_index(save_directory)

    def _write_model_card(self, save_directory: str, names: list[str]) -> None:
        from ._version import __version__
        from .model_card import write_model_card

        config = self.peft_config[names[0] if names else self.active_adapter]
        base = config.base_model_name_or_path
        tags = ["peftkit", *(f"base_model:adapter:{base}" for base in [base] if base)]
        tags += sorted({str(self.peft_config[n].peft_type).lower() for n in names})
        if isinstance(self.get_base_model(), PreTrainedModel):
            tags.append("transformers")
        pipeline = "text-generation" if isinstance(self, TASK_MODELS.get("CAUSAL_LM", ())) else None
        methods = sorted({str(self.peft_config[n].peft_type) for n in names})
        write_model_card(save_directory, base, methods, tags, pipeline, __version__)

    def _config_for_saving(self, adapter_name: str) -> PeftConfig:
        config = dataclasses.replace(self.peft_config[adapter_name], inference_mode=True)
        if config.task_type is None and config.auto_mapping is None:
            base = self.get_base_model()
            config = dataclasses.replace(
                config,
                auto_mapping={
                    "base_model_class": type(base).__name__,
                    "parent_library": type(base).__module__,
                },
            )
        return config

    def _write_resume_index(self, save_directory: str) -> None:
        """In a Trainer checkpoint folder, `model.safetensors` names the active adapter's file (a hard link, a
        copy where links are impossible). Trainer knows no adapter files unless it sees an HF peft model: both
        `train(resume_from_checkpoint=...)` and `load_best_model_at_end` then read `model.safetensors` through
        `load_state_dict`, which maps the file keys onto the active adapter. (Without it, `load_best_model_at_end`
        looks for `pytorch_model.bin`.) A non-default active adapter lives in its sub-folder, so the link
        points there, never at `default`'s file."""
        name = self.active_adapter
        folder = save_directory if name == "default" else os.path.join(save_directory, name)
        source = os.path.join(folder, io.SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(source):
            return  # saved as .bin (safe_serialization=False): Trainer's WEIGHTS_NAME is not ours to fake
        target = os.path.join(save_directory, TRAINER_MODEL_FILE)
        if os.path.lexists(target):
            os.remove(target)
        encoder = self._prompt_encoder_state()
        if encoder is not None:  # the file holds only the encoder's output rows: resume needs its weights
            tensors = self.get_adapter_state_dict(name)
            tensors.pop(io.PROMPT_EMBEDDINGS_KEY, None)
            io.save_tensors(target, {**tensors, **{k: v.contiguous() for k, v in encoder.items()}})
            return
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        stale = os.path.join(save_directory, RESUME_INDEX_NAME)  # written by peftkit <= 0.1 instead
        if os.path.isfile(stale):
            os.remove(stale)

    def _prompt_encoder_state(self) -> dict[str, torch.Tensor] | None:
        """The active prompt encoder's own tensors under their in-memory keys when it has more than its table
        (P-tuning's MLP/LSTM, prefix tuning's projection), else None: the adapter file stores only the rows the
        encoder computes, so a Trainer checkpoint's `model.safetensors` carries these instead (resume)."""
        encoders, name = self._modules.get("prompt_encoder"), self.active_adapter
        if encoders is None or name not in encoders:
            return None
        state = encoders[name].state_dict()
        return (
            None
            if list(state) == ["embedding.weight"]
            else {f"prompt_encoder.{name}.{k}": v for k, v in state.items()}
        )

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """Everything but the active adapter: what a resumed Trainer checkpoint may (and should) lack."""
        adapter = set(io.adapter_key_map(self, self.active_adapter)) | set(self._prompt_encoder_state() or ())
        return [k for k in self.state_dict() if k not in adapter]

    def load_state_dict(
        self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """`nn.Module.load_state_dict`, also accepting adapter-file keys for the active adapter."""
        inverse = {disk: mem for mem, disk in io.adapter_key_map(self, self.active_adapter).items()}
        own = self.state_dict().keys()
        renamed = {(k if k in own else inverse.get(k, k)): v for k, v in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict, assign=assign)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load an adapter folder as `adapter_name` (it becomes trainable only with `is_trainable=True`; without
        it the whole model is put in eval mode, as HF peft does, so no dropout runs at inference).

        `autocast_adapter_dtype`: float16/bfloat16 adapter tensors become float32 (else they take the base
        layer's dtype); `low_cpu_mem_usage`: the adapter is created empty on the meta device and materialised
        by the file's tensors (see `tuners/placement.py`)."""
        from .adapter_loading import check_rank_fits_file, errors_name

        config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        weights_path = io.find_weights_file(model_id, kwargs.get("subfolder"))
        tensors = io.load_weights_file(weights_path)
        config_path = os.path.join(os.path.dirname(weights_path), CONFIG_NAME)
        check_rank_fits_file(config, tensors, config_path)
        if adapter_name not in self.peft_config:
            with errors_name(config_path):
                self.add_adapter(adapter_name, config, low_cpu_mem_usage, False, autocast_adapter_dtype)
        result = self._load_adapter_tensors(tensors, adapter_name, weights_path, autocast_adapter_dtype)
        self.set_adapter(self.active_adapter)
        if not is_trainable:  # as HF peft: the new adapter's dropout must not run at inference
            self.eval()
        return result

    def _load_adapter_tensors(
        self,
        tensors: dict[str, torch.Tensor],
        adapter_name: str,
        source: str,
        autocast_adapter_dtype: bool = True,
    ) -> Any:
        """Copy file tensors into `adapter_name`, checking every shape; errors name module and shapes.
        Meta tensors (`low_cpu_mem_usage`) are materialised first, on the base layers' device."""
        from .adapter_loading import copy_adapter_tensors

        self.base_model.before_loading(adapter_name)
        self.base_model.place_adapter(adapter_name, autocast_adapter_dtype)
        return copy_adapter_tensors(self, tensors, adapter_name, source)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap `model` with the adapter saved in `model_id` (a folder or Hub id); the two flags as in
        `load_adapter`."""
        from .adapter_loading import check_rank_fits_file, errors_name

        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        model_cls = TASK_MODELS.get(config.task_type, PeftModel) if cls is PeftModel else cls
        # the file first: its shapes bound what the config may ask to allocate (check_rank_fits_file)
        weights_path = io.find_weights_file(model_id, kwargs.get("subfolder"))
        tensors = io.load_weights_file(weights_path)
        config_path = os.path.join(os.path.dirname(weights_path), CONFIG_NAME)
        check_rank_fits_file(config, tensors, config_path)
        with errors_name(config_path):
            peft_model = model_cls(
                model,
                config,
                adapter_name,
                init_weights=False,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        peft_model._load_adapter_tensors(tensors, adapter_name, weights_path, autocast_adapter_dtype)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    # ----- inspection and switches (HF peft's names; the logic is in status.py and tuners/switching.py) ---------
    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One `TunerLayerStatus` per adapter layer (see `peftkit.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The adapter state of the whole model (see `peftkit.get_model_status`)."""
        return get_model_status(self)

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the active adapter."""
        return self.peft_config[self.active_adapter]

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        """The wrapped model's dtype (None when it has no `dtype`)."""
        return getattr(self.get_base_model(), "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False while adapters are disabled or none is active: then the output is the base model's.

        Unlike HF peft, which counts only `disable_adapter()` as disabled, `disable_adapter_layers()` also makes
        this False (the output is then the base model's as well)."""
        return has_active_enabled_adapter(self.base_model)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters (and their trained module copies) on or off."""
        set_requires_grad(self.base_model, adapter_names, requires_grad)


integrations.delegate_model_description(PeftModel)


# task_type -> wrapper class; filled by `task_models.py` when it is imported (the package imports it), so this
# module does not import the wrappers that subclass PeftModel
TASK_MODELS: dict[str | None, type[PeftModel]] = {}

_TASK_CLASS_NAMES = (
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "_EncoderTaskModel",
)


def __getattr__(name: str) -> Any:
    """`peftkit.peft_model.PeftModelForCausalLM` (the old path, and pickles that name it) still resolves.

    The import is here, not at the top, because `task_models` imports this module for `PeftModel`."""
    if name in _TASK_CLASS_NAMES:
        from . import task_models

        return getattr(task_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (the task wrapper follows `task_type`;
    `mixed=True`: a `PeftMixedModel`, which also takes adapters of other methods)."""
    if mixed:
        from .mixed_model import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name)
    if isinstance(model, PeftModel):
        raise ValueError(
            "get_peft_model: the model already has adapters; use model.add_adapter(name, config)"
        )
    if revision is not None:
        peft_config = dataclasses.replace(peft_config, revision=revision)
    cls = TASK_MODELS.get(peft_config.task_type, PeftModel)
    return cls(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
