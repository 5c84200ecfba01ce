"""LoHa (low-rank Hadamard product) on nn.Linear, nn.Conv2d and nn.Conv1d; the math is in `functional/loha.py`.

Tensors per adapter (HF peft's names): `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, plus the Tucker
cores `hada_t1`, `hada_t2` for a Conv2d or Conv1d with `use_effective_conv2d` (a Conv1d's core is (r, r, k, 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..functional import loha as FH
from ..inject import DEFAULT_TARGETS
from ..registry import register_peft_method
from .lycoris import LycorisConfig, LycorisLayer, LycorisTuner, kaiming_


@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter (HF peft's `LoHaConfig`; every field is described on `LycorisConfig`).

    `init_weights=True` zeroes `hada_w2_b`, so the update starts at zero.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LOHA"
        if self.init_weights not in (True, False):
            raise ValueError(f"LoHaConfig: init_weights must be True or False, got {self.init_weights!r}")


class LoHaLayer(LycorisLayer):
    """LoHa around an nn.Linear (factors (out, r) and (r, in)) or nn.Conv2d / nn.Conv1d (kernel flattened into
    `in`, or Tucker cores with use_effective_conv2d)."""

    adapter_attrs = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def _create(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        w = self.base_layer.weight
        out, rest = w.shape[0], w.shape[1:]
        if self._conv_effective(config):
            kh, kw = self._tucker_kernel()
            for i in ("1", "2"):
                getattr(self, f"hada_t{i}")[adapter_name] = nn.Parameter(torch.empty(r, r, kh, kw))
                getattr(self, f"hada_w{i}_a")[adapter_name] = nn.Parameter(torch.empty(r, out))
                getattr(self, f"hada_w{i}_b")[adapter_name] = nn.Parameter(torch.empty(r, rest[0]))
            return
        fan_in = int(torch.tensor(rest).prod())  # in, or in / groups * kh * kw for a flattened conv kernel
        for i in ("1", "2"):
            getattr(self, f"hada_w{i}_a")[adapter_name] = nn.Parameter(torch.empty(out, r))
            getattr(self, f"hada_w{i}_b")[adapter_name] = nn.Parameter(torch.empty(r, fan_in))

    def _init(self, adapter_name: str, init: bool | str) -> None:
        for attr in self.adapter_attrs:
            if adapter_name in getattr(self, attr):
                kaiming_(getattr(self, attr)[adapter_name])
        if init is True:
            nn.init.zeros_(self.hada_w2_b[adapter_name])

    def _delta(self, adapter_name: str) -> torch.Tensor:
        s = self.scaling[adapter_name]
        a1, b1 = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        a2, b2 = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if adapter_name in self.hada_t1:
            return FH.hadamard_delta_cp(
                self.hada_t1[adapter_name], a1, b1, self.hada_t2[adapter_name], a2, b2, s
            )
        return FH.hadamard_delta(a1, b1, a2, b2, s)


class LoHaModel(LycorisTuner):
    """Injects LoHa layers into a model (HF peft's `LoHaModel`)."""

    prefix = "hada_"
    layer_cls = LoHaLayer
    default_targets = DEFAULT_TARGETS  # HF peft's LoHa table equals its LoRA table for these architectures
    method_name = "LoHa"


register_peft_method(peft_type="LOHA", config_cls=LoHaConfig, tuner_cls=LoHaModel, prefix="hada_")
