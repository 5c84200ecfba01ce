"""LoKr (low-rank Kronecker product) on nn.Linear, nn.Conv2d and nn.Conv1d; the math is in `functional/lokr.py`.

Tensors per adapter (HF peft's names): the small factor `lokr_w1` or its low-rank pair `lokr_w1_a`/`lokr_w1_b`
(only with `decompose_both` and a small r), the large factor `lokr_w2` or `lokr_w2_a`/`lokr_w2_b` (when r is
small against it), and the Tucker core `lokr_t2` for a Conv2d with `use_effective_conv2d`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..functional import lokr as FK
from ..inject import DEFAULT_TARGETS
from ..registry import register_peft_method
from .lycoris import LycorisConfig, LycorisLayer, LycorisTuner, kaiming_


@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter (HF peft's `LoKrConfig`); shared fields are described on `LycorisConfig`.

    Attributes:
        decompose_both: also factor the small Kronecker factor w1 as `w1_a @ w1_b` (when r < its size / 2).
        decompose_factor: the preferred size of the small factor's dimensions (-1: near the square root).
        rank_dropout_scale: rescale the update by the kept fraction after rank dropout.
        init_weights: True (w1 = 0: the update starts at zero), "lycoris" (w2 = 0 instead), or False (random).
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LOKR"
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(
                f"LoKrConfig: init_weights must be True, False or 'lycoris', got {self.init_weights!r}"
            )


class LoKrLayer(LycorisLayer):
    """LoKr around an nn.Linear, nn.Conv2d or nn.Conv1d: out = out_l * out_k and in = in_m * in_n (`factorization`)."""

    adapter_attrs = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    rank_dropout_scale_default = False

    def _create(self, adapter_name: str, r: int, config: LoKrConfig) -> None:
        w = self.base_layer.weight
        kernel = tuple(w.shape[2:])  # () for Linear, (kh, kw) for Conv2d, (k,) for Conv1d
        out_l, out_k = FK.factorization(w.shape[0], config.decompose_factor)
        in_m, in_n = FK.factorization(w.shape[1], config.decompose_factor)
        P = nn.Parameter
        if config.decompose_both and r < max(out_l, in_m) / 2:
            self.lokr_w1_a[adapter_name], self.lokr_w1_b[adapter_name] = (
                P(torch.empty(out_l, r)),
                P(torch.empty(r, in_m)),
            )
        else:
            self.lokr_w1[adapter_name] = P(torch.empty(out_l, in_m))
        if r >= max(out_k, in_n) / 2:
            self.lokr_w2[adapter_name] = P(torch.empty(out_k, in_n, *kernel))
        elif self._conv_effective(config):
            self.lokr_t2[adapter_name] = P(torch.empty(r, r, *self._tucker_kernel()))
            self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name] = (
                P(torch.empty(r, out_k)),
                P(torch.empty(r, in_n)),
            )
        else:
            flat = in_n * int(torch.tensor(kernel).prod()) if kernel else in_n
            self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name] = (
                P(torch.empty(out_k, r)),
                P(torch.empty(r, flat)),
            )

    def _init(self, adapter_name: str, init: bool | str) -> None:
        for attr in self.adapter_attrs:
            if adapter_name in getattr(self, attr):
                kaiming_(getattr(self, attr)[adapter_name])
        if init is True:  # w1 = 0
            nn.init.zeros_((self.lokr_w1 if adapter_name in self.lokr_w1 else self.lokr_w1_a)[adapter_name])
        elif init == "lycoris":  # w2 = 0
            nn.init.zeros_((self.lokr_w2 if adapter_name in self.lokr_w2 else self.lokr_w2_b)[adapter_name])

    def _delta(self, adapter_name: str) -> torch.Tensor:
        name = adapter_name
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = FK.tucker_weight(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return FK.kron_delta(w1, w2, self.scaling[name])


class LoKrModel(LycorisTuner):
    """Injects LoKr layers into a model (HF peft's `LoKrModel`)."""

    prefix = "lokr_"
    layer_cls = LoKrLayer
    default_targets = DEFAULT_TARGETS  # HF peft's LoKr table equals its LoRA table for these architectures
    method_name = "LoKr"


register_peft_method(peft_type="LOKR", config_cls=LoKrConfig, tuner_cls=LoKrModel, prefix="lokr_")
