"""Optimizers for LoRA: LoRA+ parameter groups and the LoRA-FA optimizer (end of file).

LoRA+ (Hayou et al., 2024): train B with a larger learning rate than A.

`create_loraplus_optimizer` builds parameter groups so any torch optimizer applies it: A matrices (and
other adapter tensors) at `lr`, B matrices and 1-d tensors at `lr * loraplus_lr_ratio`, LoRA embedding
factors at `loraplus_lr_embedding`. Biases and norm weights get no weight decay.
"""

from __future__ import annotations

import math
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


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) where each LoRA B's gradient is first projected as in
    LoRA-FA (Zhang et al., 2023): with A frozen, `grad_B <- grad_B @ (A A^T)^-1 / scaling^2`, which makes B's
    step approximate a full fine-tuning step of the weight restricted to A's row space.

    Param groups are ordinary ones; `lora_pairs` maps `id(B)` to `(A, scaling)` for the B matrices to project.
    """

    def __init__(
        self,
        params: Any,
        lora_pairs: dict[int, tuple[torch.Tensor, float]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"LoraFAOptimizer: need lr >= 0, eps >= 0, betas in [0, 1); got {lr}, {eps}, {betas}"
            )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)
        self.lora_pairs = lora_pairs

    def _projected(self, p: torch.Tensor) -> torch.Tensor:
        pair = self.lora_pairs.get(id(p))
        if pair is None:
            return p.grad
        A, scaling = pair
        a = A.detach().float().flatten(1)  # (r, in)
        gram = a @ a.T + 1e-8 * torch.eye(a.shape[0], device=a.device)
        grad = p.grad.float().flatten(1) @ torch.linalg.pinv(gram) / scaling**2  # (out, r)
        return grad.reshape(p.grad.shape).to(p.grad.dtype)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._projected(p)
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr
                if group["correct_bias"]:
                    t = state["step"]
                    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-lr * group["weight_decay"])
        return loss


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
) -> LoraFAOptimizer:
    """A LoRA-FA optimizer for `model`: freezes every LoRA A and projects each B's gradient (see
    `LoraFAOptimizer`); other trainable tensors get plain AdamW.

    Args:
        r, lora_alpha, use_rslora: kept for HF peft's signature; each layer's own `scaling` (which already
            reflects rank/alpha patterns and rsLoRA) is what the projection uses. A `use_rslora` that contradicts
            an active adapter's config is an error.
        lr, weight_decay: as for AdamW.
    """
    from .tuners.lora_layers import LoraLayer

    if r <= 0 or lora_alpha <= 0:
        raise ValueError(
            f"create_lorafa_optimizer: r and lora_alpha must be > 0, got r={r}, lora_alpha={lora_alpha}"
        )
    configs = getattr(model, "peft_config", None)
    configs = configs if isinstance(configs, dict) else {}
    active = [a for a in (getattr(model, "active_adapters", None) if configs else None) or [] if a in configs]
    if use_rslora is not None:
        wrong = [a for a in active if bool(getattr(configs[a], "use_rslora", False)) != use_rslora]
        if wrong:
            raise ValueError(
                f"create_lorafa_optimizer: use_rslora={use_rslora} contradicts the config of adapters {wrong}; "
                "set use_rslora in LoraConfig and drop the argument"
            )
    pairs: dict[int, tuple[torch.Tensor, float]] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, A in module.lora_A.items():
            A.weight.requires_grad_(False)
            pairs[id(module.lora_B[name].weight)] = (A.weight, module.scaling[name])
    if not pairs:
        raise ValueError(
            f"create_lorafa_optimizer: {type(model).__name__} has no LoRA layers (Linear/Conv2d)"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return LoraFAOptimizer(params, pairs, lr=lr, weight_decay=weight_decay)
