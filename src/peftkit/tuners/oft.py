"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning") on Linear, Conv2d and
Embedding.

Each adapted layer learns a block-diagonal rotation R (r blocks of size b) of its input features: the layer
computes `base(x @ R)`, and merging rotates the weight, `W <- W @ R^T`. Each block is the Cayley transform
of a skew-symmetric matrix stored as its strict upper triangle, so the zero init is the identity rotation.
All math lives in `functional/oft.py`.

Unmerging inverts the (small) rotation blocks that were merged instead of transposing them: the default
Cayley-Neumann series is only approximately orthogonal, so R^T would not undo the merge, and keeping a copy
of every merged weight would double its memory.

Differences from HF peft 0.21, on purpose:
- Conv2d with kernels larger than 1x1: HF rotates overlapping input patches and folds them back, which is not
  the identity even at init; peftkit rotates the flattened filter (C*kh*kw) instead, the same rotation HF
  merges, so merged == unmerged. 1x1 convolutions agree with HF exactly.
- `module_dropout` is applied in training (HF creates the dropout layer but never calls it in 0.21).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig
from ..functional import oft as FO
from ..inject import resolve_target_modules
from ..registry import register_peft_method
from .base import AdapterLayer, BaseTuner
from .config_checks import check_fields


@dataclass
class OFTConfig(PeftConfig):
    """Configuration of an OFT adapter (field names and defaults as in HF peft 0.21's `OFTConfig`).

    Attributes:
        r: number of rotation blocks per layer; set exactly one of `r` and `oft_block_size` (the other 0).
        oft_block_size: size b of each rotation block (default 32); r * b = the layer's input features. A value
            that does not divide the features is moved to the nearest divisor, with a warning (as HF does).
        module_dropout: probability of replacing a rotation block by the identity in training.
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as in LoRA.
        fan_in_fan_out: kept for file compatibility (no effect; OFT adapts Linear, Conv2d and Embedding).
        bias: "none", "all" (train every bias) or "oft_only" (biases of adapted layers).
        init_weights: True starts at the identity rotation; False draws the parameters from N(0, 0.1^2).
        coft: constrained OFT: project each block's skew matrix into a ball of radius `eps` on every use.
        eps: COFT's radius.
        block_share: one rotation block shared by all blocks of a layer.
        use_cayley_neumann: approximate the Cayley transform by a Neumann series (no matrix inverse).
        num_cayley_neumann_terms: terms of that series.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "OFT"
        check_fields(self, probabilities=("module_dropout",), bias_modes=("none", "all", "oft_only"))
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ValueError(
                f"OFTConfig: set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a "
                "positive value and the other to 0 (r * oft_block_size = the layer's input features)"
            )
        if min(self.r, self.oft_block_size) < 0:
            raise ValueError("OFTConfig: r and oft_block_size must be >= 0")
        if self.num_cayley_neumann_terms < 1:
            raise ValueError("OFTConfig: num_cayley_neumann_terms must be >= 1")


def nearest_divisor(n: int, want: int) -> int:
    """The divisor of n closest to `want` (ties: the smaller); n itself when want >= n (HF peft's rule)."""
    if want >= n:
        return n
    higher = next(d for d in range(want, n + 1) if n % d == 0)
    lower = next(d for d in range(want, 0, -1) if n % d == 0)
    return lower if want - lower <= higher - want else higher


def split_features(n: int, r: int, block_size: int, where: str) -> tuple[int, int]:
    """(number of blocks, block size) for n features from a config that sets one of them."""
    if r == 0:
        b = block_size if n % block_size == 0 else nearest_divisor(n, block_size)
        if b != block_size:
            warnings.warn(
                f"{where}: oft_block_size {block_size} does not divide {n} features; using {b}", stacklevel=3
            )
        return n // b, b
    rr = r if n % r == 0 else nearest_divisor(n, r)
    if rr != r:
        warnings.warn(f"{where}: r {r} does not divide {n} features; using {rr}", stacklevel=3)
    return rr, n // rr


class OFTRotation(nn.Module):
    """One adapter's rotation: `weight` (D or 1, b*(b-1)/2) upper triangles of skew-symmetric blocks."""

    def __init__(self, blocks: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.blocks, self.block_size = blocks, block_size
        self.coft, self.eps, self.block_share = config.coft, config.eps, config.block_share
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0
        n_elements = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.zeros(1 if config.block_share else blocks, n_elements))

    def rotation_blocks(self) -> torch.Tensor:
        """The rotation as (D, b, b) orthogonal blocks (COFT projects the parameters in place first)."""
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(FO.coft_project(self.weight, self.block_size, self.eps))
        skew = FO.skew_from_triu(self.weight, self.block_size)
        rot = FO.cayley_neumann(skew, self.neumann_terms) if self.neumann_terms else FO.cayley(skew)
        return rot.expand(self.blocks, -1, -1) if self.block_share else rot


class OFTLayer(AdapterLayer):
    """OFT around a Linear (rotates the `in` features), Conv2d (rotates the flattened filter, C*kh*kw) or
    Embedding (rotates the embedding dim of the looked-up rows)."""

    adapter_attrs = ("oft_R", "oft_embedding_R")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()
        self.dropout: dict[str, float] = {}
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        if isinstance(base_layer, nn.Conv2d):
            if base_layer.groups != 1 or max(base_layer.dilation) > 1:
                raise ValueError(
                    f"OFT supports Conv2d without groups or dilation; {module_name} has neither 1"
                )
            self.features = base_layer.weight[0].numel()
        elif self.is_embedding:
            self.features = base_layer.embedding_dim
        else:
            self.features = base_layer.weight.shape[1]

    @property
    def _container(self) -> nn.ModuleDict:
        return self.oft_embedding_R if self.is_embedding else self.oft_R

    def update_layer(self, adapter_name: str, config: OFTConfig, init_weights: bool = True) -> None:
        blocks, b = split_features(self.features, config.r, config.oft_block_size, self.module_name)
        rot = OFTRotation(blocks, b, config)
        w = self.base_layer.weight
        dtype = (
            torch.float32
            if not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16)
            else w.dtype
        )
        rot.to(device=w.device, dtype=dtype)
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(rot.weight, mean=0.0, std=0.1)
        self._container[adapter_name] = rot
        self.dropout[adapter_name] = config.module_dropout
        self.set_adapter(self.active_adapters or [adapter_name])

    def rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        """(D, b, b), with module dropout in training."""
        blocks = self._container[adapter_name].rotation_blocks()
        return FO.multiplicative_dropout(blocks[None], self.dropout[adapter_name], self.training)[0]

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as a matrix whose columns are the rotated features: (out, in) / (out, C*kh*kw) / table."""
        return weight.reshape(weight.shape[0], -1)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, Any]:
        blocks = self._container[adapter_name].rotation_blocks().detach()
        rows = self._rows(weight).to(blocks.dtype)
        # Linear/Conv: W <- W @ R^T; Embedding rows are outputs, rotated like activations: E <- E @ R
        b = blocks if self.is_embedding else blocks.transpose(-2, -1)
        merged = FO.apply_blocks(rows, b).reshape(weight.shape).to(weight.dtype)
        return merged, blocks

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str, state: Any) -> torch.Tensor:
        inv = torch.linalg.inv(state.double())
        b = inv if self.is_embedding else inv.transpose(-2, -1)
        rows = FO.apply_blocks(self._rows(weight).double(), b)
        return rows.reshape(weight.shape).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Linear: x (..., in) -> (..., out); Conv2d: (N, C, H, W) -> (N, out, H', W'); Embedding: ids -> (..., dim)."""
        names = [n for n in self._active_unmerged() if n in self._container]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if self.is_embedding:
            out = base(x, *args, **kwargs)
            h = out
            for name in names:
                blocks = self.rotation_blocks(name)
                h = FO.apply_blocks(h.to(blocks.dtype), blocks)
            return h.to(out.dtype)
        if isinstance(base, nn.Conv2d):
            w = self._rows(base.weight)
            for name in names:
                blocks = self.rotation_blocks(name)
                w = FO.apply_blocks(w.to(blocks.dtype), blocks.transpose(-2, -1))
            w = w.reshape(base.weight.shape).to(x.dtype)
            return F.conv2d(x, w, base.bias, base.stride, base.padding, base.dilation, base.groups)
        h = x
        for name in names:
            blocks = self.rotation_blocks(name)
            h = FO.apply_blocks(h.to(blocks.dtype), blocks)
        return base(h.to(x.dtype), *args, **kwargs)


class OFTModel(BaseTuner):
    """Injects OFT layers into a model (HF peft's `OFTModel`)."""

    prefix = "oft_"
    layer_types: tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.Embedding)

    def resolve_config(self, config: PeftConfig) -> PeftConfig:
        return resolve_target_modules(self.model, config)

    def create_layer(
        self, target: nn.Module, config: OFTConfig, adapter_name: str, key: str, init_weights: bool = True
    ) -> AdapterLayer:
        if not isinstance(target, self.layer_types):
            names = ", ".join(t.__name__ for t in self.layer_types)
            raise ValueError(
                f"Target module {key!r} is a {type(target).__name__}; {type(self).__name__[:-5]} supports {names} "
                "(as HF peft does; GPT-2 Conv1D is not among them). Narrow target_modules so it matches only those."
            )
        layer = self.layer_cls(target, key)
        layer.update_layer(adapter_name, config, init_weights)
        layer.set_adapter(
            self.active_adapters if adapter_name not in self.active_adapters else [adapter_name]
        )
        return layer

    layer_cls = OFTLayer


register_peft_method(peft_type="OFT", config_cls=OFTConfig, tuner_cls=OFTModel, prefix="oft_")
