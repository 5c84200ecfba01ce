"""Load a transformers checkpoint lean: tensor by tensor, never holding the full-precision model.

`load_quantized` builds the model's skeleton with every parameter on the `meta` device (no memory, no random
init), swaps the target `nn.Linear` layers for empty bitsandbytes layers, then reads the safetensors shards
one tensor at a time: a Linear weight is quantized as it arrives and its float copy dropped; every other
tensor (embeddings, norms, the output head, biases) is stored in the requested dtype. With `bits=None` the
same path loads a plain model straight into `dtype` (a bf16/fp16 base without an fp32 detour).

Tensors are read with positioned `readinto` calls rather than a memory map: a mapped checkpoint's touched
pages count toward the process's resident set until unmapped, so a mmap read of a 4.4 GB checkpoint would
show 4.4 GB of RSS even though each tensor is dropped; a read into a fresh buffer keeps only what is kept.

Large temporaries (each float weight read here, and later the weight bitsandbytes dequantizes in every
forward and backward of a QLoRA step) are what fragments glibc's heap: freed, they stay resident between
longer-lived small tensors. `load_quantized` therefore has glibc serve allocations of 1 MiB and more with
their own memory map (`mallopt(M_MMAP_THRESHOLD)`), returned to the OS as soon as they are freed: on the
1.1B benchmark model this is the difference between 2.15 and ~1.6 GiB peak for a checkpointed QLoRA step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .heap import MMAP_THRESHOLD, release_freed_memory, serve_large_allocations_by_mmap
from .quantized import QuantSpec, _skipped, make_quantized_linear, mark_quantized, set_quantized_weight

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's shards: `model.safetensors`, or every file `model.safetensors.index.json` names."""
    folder = Path(model_dir)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    raise FileNotFoundError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (lean loading reads safetensors only; "
        "re-save the model with save_pretrained(safe_serialization=True))"
    )


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of one safetensors file, each read into its own new CPU tensor."""
    path = Path(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}, which lean loading cannot read"
                )
            begin, end = info["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise ValueError(f"{path}: truncated file (tensor {name!r} is cut off)")
            yield name, buf.view(dtype).reshape(info["shape"])


@contextmanager
def _empty_parameters() -> Iterator[None]:
    """Parameters registered in this block move to `meta` (buffers, e.g. rotary tables, stay real); torch and
    transformers weight init is skipped, so the float model is never allocated nor filled."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init = nullcontext()
    else:
        no_init = no_init_weights()
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        with no_init:
            yield
    finally:
        nn.Module.register_parameter = original


def load_quantized(
    model_dir: str | Path,
    bits: int | None = 4,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    dtype: torch.dtype = torch.float32,
    skip_modules: tuple[str, ...] = ("lm_head",),
    model_cls: type | None = None,
    device: str | torch.device = "cpu",
    mmap_threshold: int | None = MMAP_THRESHOLD,
) -> nn.Module:
    """A transformers model from the safetensors checkpoint in `model_dir`, its Linear layers quantized with
    bitsandbytes (`bits` 4 or 8; None: not quantized) while loading, in eval mode like `from_pretrained`.

    Args:
        bits: 4 (Linear4bit, `quant_type` "nf4"/"fp4", `double_quant`), 8 (Linear8bitLt) or None.
        compute_dtype: the 4-bit matmul dtype (default: `dtype`).
        dtype: the dtype of everything not quantized (embeddings, norms, head, biases), and of the float
            weights handed to the quantizer.
        skip_modules: module-name suffixes kept in `dtype` (the output head by default, as transformers does).
        model_cls: e.g. `AutoModelForCausalLM` (the default) or `AutoModelForSequenceClassification`.
        device: where every tensor goes as it is read (e.g. "cuda": a bf16 or quantized model built on the GPU
            one tensor at a time; not exercised on this project's CPU-only CI).
        mmap_threshold: from here on, glibc serves host allocations of at least this many bytes with their
            own memory map, handed back to the OS when freed (see `heap.serve_large_allocations_by_mmap`); None
            leaves the allocator as it is. Process-wide; it never changes a result.
    Peak memory: the quantized model plus one float tensor (the largest single weight), not the float model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model_dir)
    files = safetensors_files(folder)  # fail before building anything
    if mmap_threshold is not None:
        serve_large_allocations_by_mmap(mmap_threshold)
    config = AutoConfig.from_pretrained(folder)
    spec = None
    if bits is not None:
        spec = QuantSpec(bits, quant_type, compute_dtype or dtype, double_quant, skip_modules=skip_modules)
    with _empty_parameters():
        model = (model_cls or AutoModelForCausalLM).from_config(config, dtype=dtype)
    if spec is not None:
        _swap_in_quantized(model, spec)
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "")
    unexpected: list[str] = []
    for file in files:
        for key, tensor in iter_safetensors(file):
            name = key if key in params else f"{prefix}.{key}" if f"{prefix}.{key}" in params else None
            if name is None:
                unexpected.append(key)
                continue
            _place(model, name, tensor, dtype, f"{file}: {key}", torch.device(device))
            del tensor
    if torch.device(device).type != "cpu":  # buffers (rotary tables) were built on the CPU
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(
            f"{folder}: the checkpoint has no tensor for {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    if unexpected:
        import warnings

        warnings.warn(f"{folder}: checkpoint tensors the model does not use: {unexpected[:5]}", stacklevel=2)
    if spec is not None:
        mark_quantized(model, spec.bits)
    release_freed_memory()
    return model.eval()


def _swap_in_quantized(model: nn.Module, spec: QuantSpec) -> None:
    """Replace each (meta) `nn.Linear` not skipped by an empty bitsandbytes layer of the same shape."""
    from .quantized import _replace

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not _skipped(name, spec.skip_modules):
            q = make_quantized_linear(module.in_features, module.out_features, module.bias is not None, spec)
            _replace(model, name, q)


def _place(
    model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype, where: str, device: torch.device
) -> None:
    """Store checkpoint `tensor` as parameter `name`: quantized if its module is a bitsandbytes layer's weight."""
    from .quantized import is_quantized_linear

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = getattr(module, attr)
    if tuple(current.shape) != tuple(tensor.shape) and not (is_quantized_linear(module) and attr == "weight"):
        raise ValueError(
            f"{where}: shape {tuple(tensor.shape)}, but the model's {name} is {tuple(current.shape)}"
        )
    if is_quantized_linear(module) and attr == "weight":
        expected = (module.out_features, module.in_features)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{where}: shape {tuple(tensor.shape)}, but the model's {name} is {expected}")
        set_quantized_weight(module, tensor.to(dtype) if tensor.is_floating_point() else tensor, device)
        return
    value = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
    requires_grad = current.requires_grad and not is_quantized_linear(module)
    setattr(module, attr, nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point()))
