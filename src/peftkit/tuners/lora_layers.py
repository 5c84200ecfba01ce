"""The LoRA layers: one class per base-layer kind (Linear/Conv1D, Embedding, Conv2d); math in functional/lora.py."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import loftq as FQ
from ..functional import lora as FL
from ..functional.lora_branch import lora_branch_, lora_linear
from ..functional.lora_merged import merged_lora_linear
from ..inference_fold import current_fold, folded_weight
from ..inject import Conv1D
from .base import AdapterLayer
from .lora_config import LoraConfig

# Rows (tokens) from which a dropout-free LoRA Linear trains through one GEMM with W + s*B@A (see
# functional/lora_merged.py); below it building that weight costs more than the rank-r GEMMs it saves.
_MERGED_MIN_ROWS = 1024


class _Magnitude(nn.Module):
    """DoRA's magnitude as a module holding one `weight`, so the in-memory key is
    `...lora_magnitude_vector.<adapter>.weight` as in HF peft (the file key has no `.weight`)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLayer(AdapterLayer):
    """Shared state of the LoRA layers: rank, alpha, scaling and DoRA flag per adapter."""

    # containers whose one tensor the file stores under the container's own name (no `.weight`)
    flat_file_attrs = ("lora_magnitude_vector",)

    adapter_attrs = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_dropout",
    )

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # of _Magnitude: in-memory key `...default.weight`
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}

    # kind-specific pieces -------------------------------------------------------------------------------------
    def _create(self, adapter_name: str, r: int) -> None:
        """Create A and B (B with a bias when `self.lora_bias[adapter_name]`)."""
        raise NotImplementedError

    def _init_weights(self, adapter_name: str, init: bool | str, config: LoraConfig | None = None) -> None:
        raise NotImplementedError

    def _weight_rows(self) -> torch.Tensor:
        """The base weight with output units first: (out, in) or (out, in, kh, kw)."""
        return self.base_layer.weight

    def _from_rows(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of `_weight_rows` for a tensor of that shape."""
        return w

    # shared -----------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, init_weights: bool = True) -> None:
        r, alpha = config.rank_for(self.module_name), config.alpha_for(self.module_name)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = FL.lora_scaling(r, alpha, config.use_rslora)
        self.use_dora[adapter_name] = config.use_dora
        self.lora_bias[adapter_name] = config.lora_bias
        if config.lora_bias and self.bias is None:
            warnings.warn(
                f"lora_bias=True on {self.module_name or type(self.base_layer).__name__}, which has no bias: "
                "this adapter cannot be merged into it",
                stacklevel=3,
            )
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self._create(adapter_name, r)
        self._init_weights(adapter_name, config.init_lora_weights if init_weights else False, config)
        self._to_base_device(adapter_name)
        if config.use_dora:
            with torch.no_grad():
                w = self._weight_rows().float()
                norm = FL.row_norm(w + self._delta_rows(adapter_name).float())
            shape = self._magnitude_shape(norm.shape[0])
            self.lora_magnitude_vector[adapter_name] = _Magnitude(
                norm.reshape(shape).to(self._adapter_dtype())
            )
        self.set_adapter(self.active_adapters or [adapter_name])

    def _magnitude_shape(self, out: int) -> tuple[int, ...]:
        """How the DoRA magnitude is stored (the file shape HF peft uses): (out,)."""
        return (out,)

    def _magnitude(self, adapter_name: str) -> torch.Tensor:
        """The DoRA magnitude as a flat (out,) vector."""
        return self.lora_magnitude_vector[adapter_name].weight.flatten()

    def _adapter_dtype(self) -> torch.dtype:
        """fp32 adapters on half-precision bases (stable training); otherwise the base's float dtype."""
        w = self.base_layer.weight
        if not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return w.dtype

    def _to_base_device(self, adapter_name: str) -> None:
        device, dtype = self.base_layer.weight.device, self._adapter_dtype()
        for attr in ("lora_A", "lora_B"):
            if adapter_name in getattr(self, attr):
                getattr(self, attr)[adapter_name].to(device=device, dtype=dtype)
        for attr in ("lora_embedding_A", "lora_embedding_B"):
            container = getattr(self, attr)
            if adapter_name in container:
                container[adapter_name] = nn.Parameter(container[adapter_name].data.to(device, dtype))

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        """The update with output units first, like `_weight_rows()`."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._from_rows(self._delta_rows(adapter_name))

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, Any]:
        if self.lora_bias.get(adapter_name) and self.bias is None:
            raise ValueError(
                f"Cannot merge adapter {adapter_name!r} into {self.module_name or type(self.base_layer).__name__}: "
                "it has lora_bias=True and the base layer has no bias to fold it into"
            )
        if not self.use_dora[adapter_name]:
            return super().merge_weight(weight, adapter_name)
        rows = self._weight_rows().detach()
        merged, norm = FL.dora_merge(
            rows, self._delta_rows(adapter_name).to(rows.dtype), self._magnitude(adapter_name).to(rows.dtype)
        )
        return self._from_rows(merged), norm

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str, state: Any) -> torch.Tensor:
        if not self.use_dora[adapter_name]:
            return super().unmerge_weight(weight, adapter_name, state)
        rows = self._weight_rows().detach()
        orig = FL.dora_unmerge(
            rows,
            self._delta_rows(adapter_name).to(rows.dtype),
            self._magnitude(adapter_name).to(rows.dtype),
            state,
        )
        return self._from_rows(orig)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        """lora_bias: the branch adds `scaling * B.bias`, which merging moves into the base bias."""
        if self.lora_bias.get(adapter_name):
            with torch.no_grad():
                b = self.lora_B[adapter_name].bias
                self.bias.add_(b.to(self.bias.dtype), alpha=sign * self.scaling[adapter_name])

    def _branch(self, name: str, xa: torch.Tensor) -> torch.Tensor:
        """scaling * B(A(xa)); with lora_bias the scaling applies to B's bias too (as in HF peft)."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        return B(A(xa)) * s if B.bias is not None else B(A(xa) * s)

    def _add_update(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """`result` (the layer output so far) plus adapter `name`'s update on input `x`: the LoRA branch added,
        or DoRA's rescaled output. The plain path of every kind; Linear also has faster exact paths."""
        drop = self.lora_dropout[name]
        xa = drop(x.to(self.lora_A[name].weight.dtype))
        lora = self._branch(name, xa)
        if not self.use_dora[name]:
            return result + lora.to(result.dtype)
        return self._dora_update(result, xa, lora, name, isinstance(drop, nn.Identity))

    def _frozen_output(self, xa: torch.Tensor) -> torch.Tensor:
        """The frozen layer on the (dropped-out) adapter input, without bias."""
        raise NotImplementedError

    def _bias_view(self) -> torch.Tensor:
        """The base bias shaped to broadcast over the layer output."""
        return self.bias

    def _dora_update(
        self, result: torch.Tensor, xa: torch.Tensor, lora: torch.Tensor, name: str, no_dropout: bool
    ) -> torch.Tensor:
        """DoRA's output from the base output `result`, the adapter input `xa` and `lora` = s * B(A(xa)).

        Without dropout the frozen layer's bias-free output is `result - bias` (no second matmul); with dropout
        it is recomputed on the dropped-out input."""
        if no_dropout:
            base_nb = result if self.bias is None else result - self._bias_view()
        else:
            base_nb = self._frozen_output(xa)
        norm = self._dora_norm(name).to(lora.dtype)
        return FL.dora_output(result, base_nb.to(lora.dtype), lora, norm, self._magnitude(name)).to(
            result.dtype
        )

    def _dora_norm(self, adapter_name: str) -> torch.Tensor:
        """||W + dW||_row, detached (DoRA treats it as a constant). (out,)"""
        w = self._weight_rows()
        return FL.row_norm(w + self._delta_rows(adapter_name).to(w.dtype)).detach()


class LoraLinear(LoraLayer):
    """LoRA on `nn.Linear` (weight (out, in)) or transformers' `Conv1D` (weight (in, out))."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.transposed = isinstance(Conv1D, type) and isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        )

    def _create(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=self.lora_bias[adapter_name])

    def _init_weights(self, adapter_name: str, init: bool | str, config: LoraConfig | None = None) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            elif init == "loftq":
                self._loftq_init(adapter_name, config.loftq_config)
                return
            elif isinstance(init, str) and init.startswith(("pissa", "olora")):
                self._principal_init(adapter_name, init)
                return
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
            if self.lora_B[adapter_name].bias is not None:
                nn.init.zeros_(self.lora_B[adapter_name].bias)

    def _loftq_init(self, adapter_name: str, loftq_config: dict) -> None:
        """LoftQ: the base weight becomes its NormalFloat quantization Q; B @ A the rank-r fit of W - Q, divided by
        the scaling so that Q + scaling * B @ A ~ W. (HF peft leaves the scaling in, exact only when it is 1.)"""
        s, base = self.scaling[adapter_name], self.base_layer.weight
        q, L, R = FQ.loftq(
            self._weight_rows(), self.r[adapter_name], loftq_config["loftq_bits"], loftq_config["loftq_iter"]
        )
        self.lora_A[adapter_name].weight.data.copy_(R / math.sqrt(s))
        self.lora_B[adapter_name].weight.data.copy_(L / math.sqrt(s))
        base.data.copy_(self._from_rows(q).to(base.dtype))

    def _principal_init(self, adapter_name: str, init: str) -> None:
        """PiSSA (top singular vectors) or OLoRA (QR); the base weight keeps the residual W - s*B@A."""
        r, s = self.r[adapter_name], self.scaling[adapter_name]
        base = self.base_layer.weight
        w = self._weight_rows().float()
        if init == "olora":
            q, rr = torch.linalg.qr(w)
            B, A = q[:, :r], rr[:r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            else:
                niter = int(init.rsplit("_", 1)[1])
                U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
                Vh = V.T
            root = torch.sqrt(S[:r] / s)
            A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
        self.lora_A[adapter_name].weight.data.copy_(A.contiguous())
        self.lora_B[adapter_name].weight.data.copy_(B.contiguous())
        base.data.copy_(self._from_rows(w - s * (B @ A)).to(base.dtype))

    def _weight_rows(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.transposed else w

    def _from_rows(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.transposed else w

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        return FL.linear_delta(
            self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, self.scaling[adapter_name]
        )

    def _plain(self, name: str, x: torch.Tensor) -> bool:
        """Plain LoRA (no DoRA, no custom dropout) on a Linear/Conv1D, adapter in x's dtype, no autocast: what
        the custom autograd Functions of `lora_branch` and `lora_merged` handle."""
        base, drop, A = self.base_layer, self.lora_dropout[name], self.lora_A[name].weight
        return (
            not self.use_dora[name]
            and self.lora_B[name].bias is None
            and (type(base) is nn.Linear or (isinstance(Conv1D, type) and type(base) is Conv1D))
            and type(drop) in (nn.Identity, nn.Dropout)
            and x.dtype == A.dtype == self.lora_B[name].weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _in_place_ok(self, name: str, result: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether `lora_branch_` may add this adapter into `result` in place: plain LoRA (a base whose
        backward does not need its output), one dtype throughout, a contiguous output."""
        return (
            self._plain(name, x)
            and result.dtype == x.dtype
            and result.is_contiguous()
            and result.shape[:-1] == x.shape[:-1]
        )

    def _one_node_ok(self, name: str, x: torch.Tensor) -> bool:
        """Whether training may run the frozen base and adapter `name` as one autograd node (`lora_linear`):
        grad on, plain LoRA on a frozen, hook-free Linear/Conv1D, weight and bias in x's dtype."""
        base, w = self.base_layer, self.base_layer.weight
        return (
            torch.is_grad_enabled()
            and not w.requires_grad
            and not (base._forward_hooks or base._forward_pre_hooks)
            and x.dtype == w.dtype == (x.dtype if base.bias is None else base.bias.dtype)
            and self._plain(name, x)
        )

    def _merged_ok(self, names: list[str], x: torch.Tensor) -> bool:
        """Whether forward may run as one GEMM with W + sum s*B@A (`merged_lora_linear`): training-size
        input with grad on, and every adapter plain dropout-free LoRA on a frozen, hook-free base in x's dtype."""
        base, w = self.base_layer, self.base_layer.weight
        return (
            bool(names)
            and torch.is_grad_enabled()
            and x.numel() >= _MERGED_MIN_ROWS * x.shape[-1] > 0
            and not w.requires_grad
            and not (base._forward_hooks or base._forward_pre_hooks)
            and x.dtype == w.dtype == (x.dtype if base.bias is None else base.bias.dtype)
            and all(self._plain(n, x) and self._no_dropout(n) for n in names)
        )

    def _inference_plain(self, names: list[str], x: torch.Tensor) -> bool:
        """Whether, for no-grad inference on x (..., in), this layer is exactly its base Linear/Conv1D (no hooks,
        weight and bias in x's dtype) plus the plain LoRA updates of adapters `names`, none with dropout active:
        the one eligibility rule of the inference fold (`inference_fold`) and the mixed-batch fast path."""
        base = self.base_layer
        return (
            not base._forward_hooks
            and not base._forward_pre_hooks
            and x.dtype == base.weight.dtype
            and (base.bias is None or base.bias.dtype == base.weight.dtype)
            and all(self._plain(n, x) and self._no_dropout(n) for n in names)
        )

    def _no_dropout(self, name: str) -> bool:
        """Whether this adapter's dropout is the identity right now (none, p == 0, or eval mode)."""
        drop = self.lora_dropout[name]
        return isinstance(drop, nn.Identity) or drop.p == 0.0 or not drop.training

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        folded = None if args or kwargs else current_fold(self, x)  # checked earlier in this generate call
        if folded is not None:
            return F.linear(x, folded, self.base_layer.bias)
        names = self._active_unmerged()
        folded = None if args or kwargs else folded_weight(self, names, x)  # no grad: see inference_fold
        if folded is not None:
            return F.linear(x, folded, self.base_layer.bias)
        if not (args or kwargs) and self._merged_ok(names, x):  # one GEMM each way: see lora_merged
            adapters = [(self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]) for n in names]
            return merged_lora_linear(x, self._weight_rows(), self.base_layer.bias, adapters)
        if not (args or kwargs) and len(names) == 1 and self._one_node_ok(names[0], x):  # see lora_linear
            A, B, drop = self.lora_A[names[0]], self.lora_B[names[0]], self.lora_dropout[names[0]]
            p = drop.p if isinstance(drop, nn.Dropout) else 0.0
            w, scaling = self._weight_rows(), self.scaling[names[0]]
            return lora_linear(x, w, self.base_layer.bias, A.weight, B.weight, scaling, p, drop.training)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            if self._in_place_ok(name, result, x):  # same math, no (N, out) temporaries: see lora_branch
                p = drop.p if isinstance(drop, nn.Dropout) else 0.0
                result = lora_branch_(result, x, A.weight, B.weight, self.scaling[name], p, drop.training)
                continue
            result = self._add_update(result, x, name)
        return result

    def _frozen_output(self, xa: torch.Tensor) -> torch.Tensor:
        """The frozen layer on xa (..., in) without its bias: (..., out)."""
        return F.linear(xa, self._weight_rows().to(xa.dtype))


class LoraEmbedding(LoraLayer):
    """LoRA on `nn.Embedding` (table (num_embeddings, dim)); A (r, num_embeddings), B (dim, r)."""

    def _create(self, adapter_name: str, r: int) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, num))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(dim, r))

    def _init_weights(self, adapter_name: str, init: bool | str, config: LoraConfig | None = None) -> None:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        with torch.no_grad():
            if init is True:
                nn.init.zeros_(A)
                nn.init.normal_(B)
            elif init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
                nn.init.zeros_(B)
            elif init is False:
                nn.init.normal_(A)
                nn.init.normal_(B)
            else:
                raise ValueError(
                    f"init_lora_weights={init!r} is not supported for Embedding ({self.module_name})"
                )

    def update_layer(self, adapter_name: str, config: LoraConfig, init_weights: bool = True) -> None:
        if config.lora_bias:
            raise ValueError(
                f"LoRA on an Embedding ({self.module_name}) does not support lora_bias; "
                "exclude it from target_modules or switch the option off"
            )
        super().update_layer(
            adapter_name, config, init_weights
        )  # DoRA: magnitude (dim,), norms over the vocab

    def _weight_rows(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def _from_rows(self, w: torch.Tensor) -> torch.Tensor:
        return w.T

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        return FL.embedding_delta(
            self.lora_embedding_A[adapter_name],
            self.lora_embedding_B[adapter_name],
            self.scaling[adapter_name],
        ).T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (...) token ids -> (..., dim). DoRA rescales each of the dim output columns (no dropout here)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_unmerged():
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_a = FL.embed_with(x, A.T, self.base_layer)  # (..., r)
            lora = (after_a * self.scaling[name]) @ B.T  # (..., dim)
            if self.use_dora[name]:
                result = self._dora_update(result, after_a, lora, name, no_dropout=True)
            else:
                result = result + lora.to(result.dtype)
        return result


class LoraConv2d(LoraLayer):
    """LoRA on `nn.Conv2d`: A is a conv with the base's kernel/stride/padding to r channels, B a 1x1 conv."""

    def _create(self, adapter_name: str, r: int) -> None:
        base = self.base_layer
        if base.groups != 1:
            raise ValueError(
                f"LoRA on grouped Conv2d (groups={base.groups}) is not supported ({self.module_name})"
            )
        self.lora_A[adapter_name] = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
        )
        self.lora_B[adapter_name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=self.lora_bias[adapter_name])

    def _init_weights(self, adapter_name: str, init: bool | str, config: LoraConfig | None = None) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            elif init is True:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            else:
                raise ValueError(
                    f"init_lora_weights={init!r} is not supported for Conv2d ({self.module_name})"
                )
            nn.init.zeros_(B)
            if self.lora_B[adapter_name].bias is not None:
                nn.init.zeros_(self.lora_B[adapter_name].bias)

    def _magnitude_shape(self, out: int) -> tuple[int, ...]:
        return (1, out, 1, 1)

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        return FL.conv2d_delta(
            self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, self.scaling[adapter_name]
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (N, in, H, W) -> (N, out, H', W')."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_unmerged():
            result = self._add_update(result, x, name)
        return result

    def _frozen_output(self, xa: torch.Tensor) -> torch.Tensor:
        """The frozen conv on xa (N, in, H, W) without its bias: (N, out, H', W')."""
        base = self.base_layer
        return F.conv2d(xa, base.weight.to(xa.dtype), None, base.stride, base.padding, base.dilation)

    def _bias_view(self) -> torch.Tensor:
        return self.bias.reshape(1, -1, 1, 1)
