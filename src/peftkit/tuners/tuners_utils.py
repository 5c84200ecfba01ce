"""`peft.tuners.tuners_utils`' public classes under peftkit's names: integrations (transformers, diffusers,
TRL) find adapter layers with `isinstance(module, BaseTunerLayer)`."""

from ..inject import get_submodule_parent
from .base import AdapterLayer as BaseTunerLayer
from .base import BaseTuner

__all__ = ["BaseTuner", "BaseTunerLayer", "get_submodule_parent"]
