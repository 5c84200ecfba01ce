"""`modules_to_save`: whole modules (a classifier head, say) trained in full and saved with the adapter.

The original stays frozen as `original_module`; each adapter gets its own trainable copy in
`modules_to_save[adapter_name]`, so switching adapters switches heads and disabling restores the base.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Routes calls to the active adapter's copy of a module, or to the original when disabled."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        for p in module.parameters():
            p.requires_grad_(False)
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Give `adapter_name` its own trainable copy of the original module."""
        if adapter_name not in self.modules_to_save:
            clone = copy.deepcopy(self.original_module)
            for p in clone.parameters():
                p.requires_grad_(True)
            self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_name: str, trainable: bool = True) -> None:
        for name, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(trainable and name == adapter_name)
        self.active_adapter = adapter_name

    @property
    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def __getattr__(self, name: str) -> Any:
        """Attributes this wrapper lacks (`weight`, `bias`, `in_features`, a config, ...) come from the
        active module, so code that reads `model.lm_head.bias` works on a wrapped head."""
        try:
            return super().__getattr__(name)  # our own parameters, buffers and sub-modules
        except AttributeError:
            if name.startswith("__") or "modules_to_save" not in self.__dict__.get("_modules", {}):
                raise  # dunders, or not built yet (__init__, copy, unpickling): never recurse
            return getattr(self.active_module, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)
