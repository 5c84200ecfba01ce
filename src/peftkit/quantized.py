"""bitsandbytes-quantized Linear layers: make, read back, rewrite and undo them.

A 4-bit layer is `bitsandbytes.nn.Linear4bit` (NF4 or FP4 codes in blocks of 64, one absmax per block,
optionally itself quantized: "double quantization"); an 8-bit layer is `bitsandbytes.nn.Linear8bitLt` (int8
codes with one scale per output row). Both are `nn.Linear` subclasses whose `weight` holds the packed codes,
so the float weight (out, in) exists only when `dequantize_weight` builds it.

`quantize_linears_` and `dequantize_linears_` swap layers in a model in place; `stream_load.load_quantized`
builds a quantized model straight from a checkpoint without the full-precision model ever existing.
bitsandbytes is optional (`pip install peftkit[quantize]`); nothing here imports it until it is needed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig default (llm_int8_threshold)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize Linear weights (the knobs of transformers' `BitsAndBytesConfig`).

    Attributes:
        bits: 4 (Linear4bit) or 8 (Linear8bitLt).
        quant_type: "nf4" or "fp4" (4-bit only).
        compute_dtype: dtype the 4-bit matmul runs in (None: the input's).
        double_quant: quantize the per-block absmax values too (4-bit only; ~0.4 bit/parameter saved).
        int8_threshold: 8-bit outlier threshold (input features above it run in 16-bit).
        skip_modules: module-name suffixes left unquantized (the output head, as transformers does).
    """

    bits: int = 4
    quant_type: str = "nf4"
    compute_dtype: torch.dtype | None = torch.float32
    double_quant: bool = True
    int8_threshold: float = INT8_THRESHOLD
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"QuantSpec: bits={self.bits!r}; expected 4 or 8")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"QuantSpec: quant_type={self.quant_type!r}; expected 'nf4' or 'fp4'")


def require_bnb():
    """The bitsandbytes module, or an ImportError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            "quantized bases need bitsandbytes: pip install 'peftkit[quantize]' (or pip install bitsandbytes)"
        ) from e
    return bitsandbytes


def quantized_bits(module: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes Linear4bit/Linear8bitLt, else None (never imports bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return 4
    if isinstance(module, bnb.nn.Linear8bitLt):
        return 8
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    return quantized_bits(module) is not None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float weight (out, in), float32, of a Linear4bit/Linear8bitLt (a new tensor; the layer is unchanged)."""
    bnb = require_bnb()
    bits, weight = quantized_bits(module), module.weight
    if bits == 4:
        state = weight.quant_state if weight.quant_state is not None else getattr(module, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                f"{type(module).__name__}: the 4-bit weight was repacked for bitsandbytes' CPU inference kernel; "
                "dequantize it before the first no-grad eval forward"
            )
        return bnb.functional.dequantize_4bit(weight.data, state).float()
    if bits == 8:
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        codes = weight.data if weight.data.dtype == torch.int8 else module.state.CB
        if codes is None or scales is None or codes.dtype != torch.int8:
            raise ValueError(f"{type(module).__name__}: the weight is not quantized yet (no int8 codes)")
        return codes.float() * (scales.float().unsqueeze(1) / 127.0)
    raise TypeError(
        f"dequantize_weight: {type(module).__name__} is not a bitsandbytes Linear4bit/Linear8bitLt"
    )


def _quantized_param(weight: torch.Tensor, bits: int, device: torch.device, **kw) -> nn.Parameter:
    """A bitsandbytes parameter holding `weight` (out, in) quantized on `device`."""
    bnb = require_bnb()
    if bits == 4:
        return bnb.nn.Params4bit(weight, requires_grad=False, **kw).to(device)
    return bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)


def set_quantized_weight(
    module: nn.Module, weight: torch.Tensor, device: torch.device | str | None = None
) -> None:
    """Quantize `weight` (out, in) into `module` (a Linear4bit/Linear8bitLt) with the module's own settings, on
    `device` (default: where the module's weight is; CPU for an empty module)."""
    bits, old = quantized_bits(module), module.weight
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(
            f"{type(module).__name__}: weight shape {tuple(weight.shape)}, expected "
            f"{(module.out_features, module.in_features)}"
        )
    if device is None:
        device = old.device if old.device.type != "meta" else torch.device("cpu")
    device = torch.device(device)
    if bits == 4:
        kw = dict(
            quant_type=old.quant_type,
            compress_statistics=old.compress_statistics,
            blocksize=old.blocksize,
            quant_storage=old.quant_storage,
            module=module,
        )
        state = getattr(old, "quant_state", None)  # requantizing: keep the dtype dequantization returns
        dtype = state.dtype if state is not None else weight.dtype
        module.weight = _quantized_param(weight.detach().to("cpu", dtype), 4, device, **kw)
    elif bits == 8:
        module.weight = _quantized_param(weight.detach().to("cpu", torch.float16), 8, device)
        module.state.CB, module.state.SCB = None, None
    else:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes Linear4bit/Linear8bitLt")


def make_quantized_linear(
    in_features: int, out_features: int, bias: bool, spec: QuantSpec, device: str = "meta"
) -> nn.Module:
    """An empty Linear4bit/Linear8bitLt (weight filled later by `set_quantized_weight`)."""
    bnb = require_bnb()
    if spec.bits == 4:
        return bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias,
            compute_dtype=spec.compute_dtype,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            device=device,
        )
    return bnb.nn.Linear8bitLt(
        in_features,
        out_features,
        bias=bias,
        has_fp16_weights=False,
        threshold=spec.int8_threshold,
        device=device,
    )


# peft types whose layers run on a bitsandbytes base (LoRA's covers DoRA and rsLoRA), as named in errors
QUANTIZED_BASE_METHODS = {"LORA": "LoRA (also DoRA, rsLoRA)", "IA3": "IA3"}


def check_quantized_targets(model: nn.Module, keys: list[str], peft_type: str | None) -> None:
    """Refuse, before anything is wrapped, a method that cannot adapt a bitsandbytes Linear4bit/Linear8bitLt
    (its layers would try to train or reshape the packed codes).

    Raises:
        ValueError: naming the first quantized target module, the method, and the methods that work.
    """
    if peft_type in QUANTIZED_BASE_METHODS:
        return
    for key in keys:
        target = model.get_submodule(key)
        target = getattr(target, "base_layer", target)  # already wrapped by another adapter
        bits = quantized_bits(target)
        if bits is not None:
            raise ValueError(
                f"{key} is a bitsandbytes {bits}-bit {type(target).__name__}, which {peft_type} cannot adapt; "
                f"methods that train on a quantized base: {', '.join(QUANTIZED_BASE_METHODS.values())}. "
                "Leave it out of target_modules, or dequantize the base first "
                "(peftkit.quantized.dequantize_linears_)"
            )


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_linears_(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace every plain `nn.Linear` of `model` (except `spec.skip_modules`) by its quantized version, one
    layer at a time (each float weight is freed as soon as its layer is replaced); returns `model`."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _skipped(name, spec.skip_modules):
            continue
        q = make_quantized_linear(module.in_features, module.out_features, module.bias is not None, spec)
        set_quantized_weight(q, module.weight.data)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        _replace(model, name, q)
    mark_quantized(model, spec.bits)
    return model


def dequantize_linears_(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every Linear4bit/Linear8bitLt (also inside adapter layers) by an `nn.Linear` holding its
    dequantized weight in `dtype`; merging into that base is then exact. Returns `model`."""
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        w = dequantize_weight(module).to(dtype)
        plain = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        plain.weight = nn.Parameter(w, requires_grad=False)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=module.bias.requires_grad)
        _replace(model, name, plain)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        _set_flag(model, flag, False)
    return model


def mark_quantized(model: nn.Module, bits: int) -> None:
    """The flags transformers sets on a bitsandbytes model (`prepare_model_for_kbit_training` reads them)."""
    _set_flag(model, f"is_loaded_in_{bits}bit", True)


def _set_flag(model: nn.Module, flag: str, value: bool) -> None:
    try:
        setattr(model, flag, value)
    except AttributeError:  # a read-only property on this transformers version
        pass


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
