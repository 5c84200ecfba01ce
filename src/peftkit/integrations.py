"""How a peftkit model looks to transformers, TRL and accelerate, which special-case HF peft's classes.

transformers (`Trainer`, `trainer_utils`, NEFTune, Liger, pipelines), TRL and accelerate ask
`isinstance(model, peft.PeftModel)` and, for an HF peft model, inspect the *base* model instead of the wrapper:
its `forward` signature (which dataset columns to keep, whether it takes `num_items_in_batch`), its class
(default `label_names`, `can_return_loss`), its class name (label smoothing shifts labels for causal LMs), and
TRL patches the base model's `forward` (its fused LM head). A peftkit model is not an HF peft instance (HF peft
need not even be installed), so it is inspected directly. Rather than patch those libraries, peftkit makes
its wrapper answer every such question the way the base model would:

- `specialise(wrapper_cls, base_cls)`: a subclass of the task wrapper, created once per base class and of the
  same name, whose `forward` carries the base model's signature (`__signature__`). `inspect.signature` of the
  class *and* of an instance's bound `forward` then shows the base's parameters (`input_ids`, `labels`,
  `token_type_ids`, `position_ids`, `**kwargs`, ...), exactly what transformers reads from an HF peft model's
  base. The wrapper's own `forward` still runs (it is called by the subclass's).
- `redirect_forward_patch`: TRL's `add_fused_lm_head(model)` replaces `model.forward` with a function that
  calls `self.base_model` (the backbone) and captures the old `model.forward`. Given a peftkit model, that
  patch is moved onto the wrapped transformers model, where TRL puts it for an HF peft model.

- `delegate_model_description`: the class-level facts `PreTrainedModel` declares read the base model's values.
- `check_wrapper_kwargs`: arguments the wrapper cannot honour are errors (`adapter_names` is honoured: see
  `mixed_batch`).

Everything else transformers asks (`_get_name`, `can_generate`, `get_input_embeddings`, `loss_type`, ...)
is delegated to the base model by `PeftModel` itself.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from . import mixed_batch

_SPECIALISED: dict[tuple[type, type], type] = {}


def base_forward_signature(base_cls: type) -> inspect.Signature | None:
    """The signature of `base_cls.forward` (with `self`), following decorators; None if it has none."""
    forward = getattr(base_cls, "forward", None)
    if forward is None:
        return None
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def specialise(wrapper_cls: type, base_cls: type) -> type:
    """`wrapper_cls` with a `forward` that shows `base_cls.forward`'s signature (cached per pair).

    The subclass keeps the wrapper's name, module and docstring, so `repr`, error messages and pipelines'
    class-name checks see `PeftModelForCausalLM` etc.; `isinstance` with the wrapper class holds."""
    key = (wrapper_cls, base_cls)
    if key in _SPECIALISED:
        return _SPECIALISED[key]
    signature = base_forward_signature(base_cls)
    if signature is None:
        _SPECIALISED[key] = wrapper_cls
        return wrapper_cls
    inner = wrapper_cls.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with mixed_batch.from_kwargs(self, args, kwargs):  # a direct forward(..., adapter_names=...) call
            return inner(self, *args, **kwargs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = inner.__doc__
    forward.__name__ = "forward"
    forward.__qualname__ = f"{wrapper_cls.__qualname__}.forward"
    namespace = {
        "forward": forward,
        "__module__": wrapper_cls.__module__,
        "__qualname__": wrapper_cls.__qualname__,
        "__doc__": wrapper_cls.__doc__,
        "_peftkit_wrapper_class": wrapper_cls,
        "_peftkit_base_class": base_cls,
    }
    cls = type(wrapper_cls.__name__, (wrapper_cls,), namespace)
    _SPECIALISED[key] = cls
    return cls


def new_specialised(wrapper_cls: type, base_cls: type) -> Any:
    """An empty instance of the specialised class (unpickling; the state is set afterwards)."""
    return nn.Module.__new__(specialise(wrapper_cls, base_cls))


def unspecialised(cls: type) -> type:
    """The task wrapper class `cls` was specialised from (`cls` itself if it was not)."""
    return cls.__dict__.get("_peftkit_wrapper_class", cls)


def check_wrapper_kwargs(model: Any, task_ids: Any, kwargs: dict[str, Any]) -> None:
    """Arguments the wrapper takes but cannot honour are errors, never silently dropped."""
    if task_ids is not None:
        raise ValueError(
            "task_ids is used by multitask prompt tuning, which peftkit does not implement; "
            f"the {model.peft_type} adapter {model.active_adapter!r} would ignore it"
        )


def delegate_model_description(cls: type) -> None:
    """Class-level facts `PreTrainedModel` declares (`_supports_sdpa`, `_tied_weights_keys`, `_tp_plan`,
    `base_model_prefix`, `config_class`, ...) would otherwise read as the wrapper's empty defaults; HF peft's
    wrapper forwards them to the base model, and so does peftkit (setting one sets it on the base model)."""
    for klass in PreTrainedModel.__mro__:
        if not klass.__module__.startswith("transformers."):
            continue  # nn.Module's own class attributes describe the wrapper itself
        for name, value in vars(klass).items():
            if name.startswith("__") or name in cls.__dict__ or callable(value):
                continue
            if isinstance(value, (property, classmethod, staticmethod)) or hasattr(value, "__get__"):
                continue
            setattr(cls, name, _delegated(name, value))


def _delegated(name: str, default: Any) -> property:
    def get(self: nn.Module) -> Any:
        tuner = self.__dict__.get("_modules", {}).get("base_model")  # None while the wrapper is being built
        model = getattr(tuner, "model", None)
        return default if model is None else getattr(model, name, default)

    def set_(self: nn.Module, value: Any) -> None:
        setattr(self.get_base_model(), name, value)

    return property(get, set_, doc=f"The base model's `{name}`.")


def redirect_forward_patch(model: nn.Module, value: Any) -> bool:
    """Move a `forward` patch meant for a transformers model (TRL's fused LM head) onto `model`'s base model.

    Recognised shape: `model.forward = MethodType(fn, model)` where `fn` closes over the current bound
    `model.forward` (to call it when the patch does not apply). The patch is rebuilt with that captured forward
    replaced by the base model's own and bound to the base model, as if it had been applied to the base model
    (what TRL does for an HF peft model). Returns False (nothing done) for any other assignment, e.g.
    accelerate's mixed-precision wrapper, which wraps the *function* and stays on the wrapper."""
    if not isinstance(value, types.MethodType) or value.__self__ is not model:
        return False
    fn = value.__func__
    cells = fn.__closure__ or ()
    current = model.forward  # the class's, or an earlier patch that stays on the wrapper (accelerate's)
    own = [i for i, c in enumerate(cells) if _is_forward_of(model, _cell_contents(c), current)]
    if not own:
        return False
    base = model.get_base_model()
    original = base.forward
    closure = tuple(types.CellType(original) if i in own else c for i, c in enumerate(cells))
    patched = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    patched.__kwdefaults__ = fn.__kwdefaults__
    patched.__dict__.update(fn.__dict__)
    patched.__wrapped__ = type(base).forward  # type: ignore[attr-defined]
    patched.__doc__ = fn.__doc__
    base.forward = types.MethodType(patched, base)
    return True


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _is_forward_of(model: nn.Module, obj: Any, current: Any) -> bool:
    return isinstance(obj, types.MethodType) and obj.__self__ is model and obj == current
