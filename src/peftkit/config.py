"""`PeftConfig`: the base dataclass every method's config extends, and reading/writing `adapter_config.json`.

Field names and defaults follow HF peft so a config written by either library loads in the other. Configs are
validated on construction (`__post_init__`) and never mutated afterwards: derived configs are made with
`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from .hub_files import resolve_adapter_file

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """The task a PEFT model is wrapped for; picks the `PeftModel` subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Names of the methods, as written to `adapter_config.json`."""

    LORA = "LORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    ADALORA = "ADALORA"
    VERA = "VERA"
    OFT = "OFT"
    BOFT = "BOFT"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    LN_TUNING = "LN_TUNING"


# Fields HF peft writes that peftkit accepts only at their default value: a config that sets one of them asks
# for behaviour peftkit does not implement, so loading it must fail loudly rather than silently differ.
_UNSUPPORTED_IF_SET = {
    "layer_replication": None,
    "lora_bias": False,
    "use_qalora": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "megatron_config": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "ensure_weight_tying": False,
}
# Fields HF peft writes that carry no behaviour for peftkit (bookkeeping or features' sub-configs whose
# default is "off"); read and dropped without a warning.
_IGNORED_FIELDS = {
    "peft_version",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "qalora_group_size",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "velora_config",
    "runtime_config",
}


def read_json_file(path: str) -> Any:
    """The JSON value in `path` (a UTF-8 BOM is allowed); errors name the file and the line or byte at fault."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def value_fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits a field's annotation (ints are floats; bools are neither; a float
    must be finite). Annotations this does not model (classes, Any) accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(value):  # a sub-config object passed in code (e.g. a LoftQConfig)
        return True
    if origin in (typing.Union, types.UnionType):
        return any(value_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, (list, tuple, set)) and (
            not args or all(value_fits(v, args[0]) for v in value)
        )
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(value_fits(k, args[0]) and value_fits(v, args[1]) for k, v in value.items())
    return True


def describe_type(hint: Any) -> str:
    """`list[str] | str | None` -> "a list of str, a str or null" (the words of the JSON the file holds)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in args]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}"
    if origin is dict:
        return f"an object of {describe_type(args[1]).removeprefix('a ').removeprefix('an ')} values"
    name = {
        bool: "true/false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        dict: "an object",
        list: "a list",
    }.get(hint, getattr(hint, "__name__", str(hint)))
    return name


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


@dataclass
class PeftConfig:
    """Fields shared by every method.

    Attributes:
        peft_type: the method name (set by each subclass; written to the file).
        task_type: one of `TaskType` (or None for a plain `PeftModel`).
        inference_mode: True when the adapter is loaded for inference only (nothing trainable).
        base_model_name_or_path: where the base model came from, recorded for users and the Hub.
        revision: the base model's revision, if any.
        auto_mapping: for `task_type=None`, the base model's class and library (HF peft writes it).
    """

    peft_type: str | None = field(default=None, metadata={"help": "method name"})
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict | None = None

    def __post_init__(self) -> None:
        self.peft_type = _enum_value(self.peft_type)
        self.task_type = _enum_value(self.task_type)
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            allowed = ", ".join(TaskType._value2member_map_)
            raise ValueError(f"task_type {self.task_type!r} is not one of: {allowed} (or None)")

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that add virtual tokens rather than wrapping layers."""
        from .registry import get_method

        return get_method(self.peft_type).is_prompt_learning

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: sets become sorted lists, enums their values."""
        out = {}
        for f in dataclasses.fields(self):
            value = _enum_value(getattr(self, f.name))
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    def to_json_bytes(self) -> bytes:
        """The contents of `adapter_config.json` for this config."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` into `save_directory` atomically."""
        from .atomic_files import atomic_write_bytes

        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json_bytes())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> PeftConfig:
        """Build the right subclass from a dict (dispatching on `peft_type` when called on the base class).

        Unknown keys (written by a newer HF peft) are dropped with a warning; keys for features peftkit does not
        implement raise if they are set to anything but their default.
        """
        from .registry import get_method

        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, found {type(data).__name__}")
        target = cls
        if cls is PeftConfig or data.get("peft_type") is not None:
            if "peft_type" not in data:
                raise ValueError(f"{source}: missing key 'peft_type' (the method name, e.g. \"LORA\")")
            try:
                target = get_method(data["peft_type"]).config_cls
            except ValueError as err:
                raise ValueError(f"{source}: key 'peft_type': {err}") from None
        names = {f.name for f in dataclasses.fields(target)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in _UNSUPPORTED_IF_SET:
                if value not in (_UNSUPPORTED_IF_SET[key], {}, []):
                    raise ValueError(
                        f"{source}: key {key!r}={value!r} asks for a feature peftkit does not support"
                    )
            elif key not in _IGNORED_FIELDS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
        hints = typing.get_type_hints(target)
        for key, value in kwargs.items():
            if not value_fits(value, hints.get(key, Any)):
                raise ValueError(
                    f"{source}: key {key!r} must be {describe_type(hints[key])}, found {_short_repr(value)}"
                )
        try:
            return target(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PeftConfig:
        """Read one `adapter_config.json`; errors name the file (and the key or line at fault)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No adapter config at {path} (expected the file {CONFIG_NAME})")
        return cls.from_dict(read_json_file(path), source=path)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Load the config from an adapter folder (local path, or a Hub id when the hub is reachable)."""
        path = resolve_adapter_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder, **kwargs)
        return cls.from_json_file(path)
