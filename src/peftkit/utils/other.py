"""`peft.utils.other`'s names integrations use, as aliases of peftkit's objects."""

from __future__ import annotations

import torch

from ..inject import get_submodule_parent as _get_submodules  # (parent, target, target_name), as HF peft's
from ..modules_to_save import ModulesToSaveWrapper
from ..training_prep import prepare_model_for_kbit_training, shift_tokens_right


def infer_device() -> str:
    """The accelerator torch would use ("cuda", "mps", "xpu"), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """`weight.T` when the layer stores (in, out) (GPT-2's Conv1D, `fan_in_fan_out=True`), else `weight`."""
    return weight.T if fan_in_fan_out else weight


__all__ = [
    "ModulesToSaveWrapper",
    "_get_submodules",
    "infer_device",
    "prepare_model_for_kbit_training",
    "shift_tokens_right",
    "transpose",
]
