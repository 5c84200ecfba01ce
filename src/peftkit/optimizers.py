"""LoRA+ (Hayou et al., 2024): train B with a larger learning rate than A.

`create_loraplus_optimizer` builds parameter groups so any torch optimizer applies it: A matrices (and
other adapter tensors) at `lr`, B matrices and 1-d tensors at `lr * loraplus_lr_ratio`, LoRA embedding
factors at `loraplus_lr_embedding`. Biases and norm weights get no weight decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_NORM_HINTS = ("norm", "ln_", "layernorm")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return name.endswith("bias") or any(h in lowered for h in _NORM_HINTS)


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The four LoRA+ groups (empty ones dropped) over the model's trainable parameters."""
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_" in name:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if _no_decay(name, param) else "B"].append(param)
        else:
            groups["A"].append(param)
    spec = {
        "A": (lr, weight_decay),
        "embedding": (loraplus_lr_embedding, weight_decay),
        "B": (lr * loraplus_lr_ratio, weight_decay),
        "B_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1]} for k, ps in groups.items() if ps]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An `optimizer_cls` over the model's trainable parameters with LoRA+ learning rates.

    Args:
        lr: learning rate of the A matrices (and other adapter tensors).
        loraplus_lr_ratio: B's learning rate divided by A's (the paper suggests 2-16; > 0).
        loraplus_lr_embedding: learning rate of LoRA factors on embedding layers.
        kwargs: passed to the optimizer (`weight_decay` is applied per group, not to biases/norms).
    """
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio}")
    weight_decay = kwargs.pop("weight_decay", 0.0)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
    if not groups:
        raise ValueError("create_loraplus_optimizer: the model has no trainable parameters")
    return optimizer_cls(groups, lr=lr, **kwargs)
