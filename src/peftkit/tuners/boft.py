"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization") on Linear and
Conv2d.

The rotation of the `n` input features is a product of `m = boft_n_butterfly_factor` butterfly factors, each a
block-diagonal rotation (D blocks of size b, exact Cayley transforms of `boft_R`) conjugated by a fixed
permutation; a learned per-output scale `boft_s` follows. The layer computes `(base(x @ M) - bias) * s + bias`;
merging sets `W <- (W @ M^T) * s`. With m = 1 it is OFT with square-matrix parameters plus the scale.
All math lives in `functional/oft.py`.

Differences from HF peft 0.21, on purpose:
- HF silently forces `boft_n_butterfly_factor` to 1 when its CUDA extension is not built (always on CPU);
  peftkit computes every butterfly factor on any device. So an adapter with m > 1 saved by HF without the
  extension holds a single factor and does not load here (and vice versa); with m = 1 files are identical.
- Unmerging inverts the merged blocks (HF transposes them), exact to rounding either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig
from ..functional import oft as FO
from ..registry import register_peft_method
from .base import AdapterLayer
from .config_checks import check_fields
from .oft import OFTModel


@dataclass
class BOFTConfig(PeftConfig):
    """Configuration of a BOFT adapter (field names and defaults as in HF peft 0.21's `BOFTConfig`).

    Attributes:
        boft_block_size: size b of each rotation block (default 4); set exactly one of this and boft_block_num.
        boft_block_num: number D of blocks per layer (b * D = the layer's input features).
        boft_n_butterfly_factor: number m of butterfly factors (1 = block-diagonal OFT); each doubles the
            reach of a rotation, so D must be divisible by 2^(m-1).
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as in LoRA.
        boft_dropout: probability of replacing a block of one random factor by the identity in training.
        fan_in_fan_out: kept for file compatibility (no effect).
        bias: "none", "all" or "boft_only".
        init_weights: True starts at the identity (R = 0, s = 1); False draws R ~ N(0, 0.1^2), s ~ N(1, 0.1^2).
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "BOFT"
        check_fields(self, probabilities=("boft_dropout",), bias_modes=("none", "all", "boft_only"))
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ValueError(
                f"BOFTConfig: set exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) to a positive value and the other to 0 (their product = in_features)"
            )
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(
                f"BOFTConfig: boft_n_butterfly_factor must be >= 1, got {self.boft_n_butterfly_factor}"
            )


def butterfly_shape(n: int, config: BOFTConfig, where: str) -> tuple[int, int]:
    """(blocks D, block size b) for n features, with the divisibility rules the butterfly needs."""
    extra = config.boft_n_butterfly_factor - 1  # factors beyond the first
    span = 2**extra
    if config.boft_block_num:
        d = config.boft_block_num
        if n % d or (extra and (extra > int(math.log2(d)) or d % span)):
            raise ValueError(
                f"{where}: boft_block_num {d} must divide the {n} features and be a multiple of "
                f"2^(boft_n_butterfly_factor - 1) = {span}"
            )
        b = n // d
    else:
        b = config.boft_block_size
        if n % (b * span):
            raise ValueError(
                f"{where}: boft_block_size {b} * 2^(boft_n_butterfly_factor - 1) = {b * span} must divide the "
                f"{n} features"
            )
        d = n // b
    if extra and (d % 2 or b % 2):
        raise ValueError(f"{where}: with butterfly factors, block number ({d}) and size ({b}) must be even")
    return d, b


class BOFTLayer(AdapterLayer):
    """BOFT around a Linear (rotates `in`) or Conv2d (rotates the flattened filter C*kh*kw).

    Attributes:
        boft_R: per adapter (m, D, b, b) raw matrices; their skew parts go through the Cayley transform.
        boft_s: per adapter output scale, (out, 1) for Linear and (1, out) for Conv2d (HF's file shapes).
    """

    adapter_attrs = ("boft_R", "boft_s")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.perms: dict[str, torch.Tensor] = {}
        self.dropout: dict[str, float] = {}
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        if self.is_conv and (base_layer.groups != 1 or max(base_layer.dilation) > 1):
            raise ValueError(f"BOFT supports Conv2d without groups or dilation ({module_name})")
        self.features = base_layer.weight[0].numel()
        self.out_features = base_layer.weight.shape[0]

    def update_layer(self, adapter_name: str, config: BOFTConfig, init_weights: bool = True) -> None:
        d, b = butterfly_shape(self.features, config, self.module_name)
        m = config.boft_n_butterfly_factor
        w = self.base_layer.weight
        kw = {
            "device": w.device,
            "dtype": torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype,
        }
        R = torch.zeros(m, d, b, b, **kw)
        s = torch.ones((1, self.out_features) if self.is_conv else (self.out_features, 1), **kw)
        if not config.init_weights:
            nn.init.normal_(R, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[adapter_name], self.boft_s[adapter_name] = nn.Parameter(R), nn.Parameter(s)
        self.perms[adapter_name] = FO.butterfly_perms(self.features, d, b, m).to(w.device)
        self.dropout[adapter_name] = config.boft_dropout
        self.set_adapter(self.active_adapters or [adapter_name])

    def rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        """The orthogonal blocks of every factor, (m, D, b, b) (module dropout applied in training)."""
        R = self.boft_R[adapter_name]
        blocks = FO.cayley(FO.skew_from_square(R))
        return FO.multiplicative_dropout(blocks, self.dropout[adapter_name], self.training)

    def _scale(self, adapter_name: str) -> torch.Tensor:
        """boft_s as a column (out, 1)."""
        return self.boft_s[adapter_name].reshape(-1, 1)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, Any]:
        blocks = self.rotation_blocks(adapter_name).detach()
        rows = weight.reshape(self.out_features, -1).to(blocks.dtype)
        rows = FO.rotate_rows(rows, blocks, self.perms[adapter_name]) * self._scale(adapter_name).detach()
        return rows.reshape(weight.shape).to(weight.dtype), blocks

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str, state: Any) -> torch.Tensor:
        rows = weight.reshape(self.out_features, -1).double() / self._scale(adapter_name).detach().double()
        rows = FO.unrotate_rows(rows, state.double(), self.perms[adapter_name])
        return rows.reshape(weight.shape).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Linear: x (..., in) -> (..., out); Conv2d: (N, C, H, W) -> (N, out, H', W')."""
        names = self._active_unmerged()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if self.is_conv:  # rotate and scale the filter, then convolve
            w = base.weight.reshape(self.out_features, -1)
            for name in names:
                w = FO.rotate_rows(
                    w.to(self.boft_R[name].dtype), self.rotation_blocks(name), self.perms[name]
                )
                w = w * self._scale(name)
            w = w.reshape(base.weight.shape).to(x.dtype)
            return F.conv2d(x, w, base.bias, base.stride, base.padding, base.dilation, base.groups)
        h, scale = x, None
        for name in reversed(names):  # HF composes adapters as x @ M_last @ ... @ M_first
            h = FO.butterfly_apply(
                h.to(self.boft_R[name].dtype), self.rotation_blocks(name), self.perms[name], True
            )
            s = self._scale(name).flatten()
            scale = s if scale is None else scale * s
        result = base(h.to(x.dtype), *args, **kwargs)
        bias = base.bias
        if bias is None:
            return (result * scale).to(result.dtype)
        return ((result - bias) * scale + bias).to(result.dtype)


class BOFTModel(OFTModel):
    """Injects BOFT layers into a model (HF peft's `BOFTModel`)."""

    prefix = "boft_"
    layer_types = (nn.Linear, nn.Conv2d)
    layer_cls = BOFTLayer


register_peft_method(peft_type="BOFT", config_cls=BOFTConfig, tuner_cls=BOFTModel, prefix="boft_")
