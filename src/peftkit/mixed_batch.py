"""Mixed-adapter batches: `model(**batch, adapter_names=[...])` runs row i through adapter `adapter_names[i]`
(`"__base__"`: no adapter), equal to running each row alone with that adapter.

Inside `mixed_adapters(model, names)` every adapter layer (and every `modules_to_save` copy) routes rows by
adapter: rows are grouped (`functional.segmented.row_groups`) and each group runs once. Plain LoRA on a
Linear/Conv1D computes the frozen layer once for the whole batch and adds each group's low-rank update to its
rows (`segmented_lora`); any other layer (DoRA, IA3, LoHa, ..., Embedding, Conv2d) runs its own forward per
group with that adapter active, so every additive method works. The layers see the batch dimension first,
which holds in the decoder body and in `generate` with a KV cache (rows repeated for beams are expanded).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .functional.segmented import batched_lora_, grouped_apply, padded_groups, row_groups, segmented_lora
from .modules_to_save import ModulesToSaveWrapper
from .tuners.base import AdapterLayer

if TYPE_CHECKING:
    from .peft_model import PeftModel

BASE_NAME = "__base__"


def check_adapter_names(model: PeftModel, names: Any, rows: int | None) -> list[str]:
    """`names` as a list, after checking it names known adapters (or `__base__`), one per row."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"adapter_names must be a list of adapter names, one per row; got {names!r}")
    names = list(names)
    unknown = sorted({n for n in names if n != BASE_NAME and n not in model.peft_config})
    if unknown:
        known = ", ".join(repr(n) for n in model.peft_config)
        raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; known: {known} (or {BASE_NAME!r})")
    if rows is not None and len(names) != rows:
        raise ValueError(
            f"adapter_names has {len(names)} entries for a batch of {rows} rows; give one per row"
        )
    prompt = [n for n in set(names) if n != BASE_NAME and model.peft_config[n].is_prompt_learning]
    if prompt:
        raise ValueError(f"adapter_names: prompt-learning adapters {prompt} cannot be mixed per row")
    return names


class RowPlan:
    """The row grouping of one mixed call, computed once per batch size (and adapter subset), not per layer."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._present: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, rows: int) -> list[tuple[str, torch.Tensor]]:
        if rows not in self._groups:
            self._groups[rows] = row_groups(self.names, rows)
        return self._groups[rows]

    def present(self, layer: Any, rows: int) -> list[tuple[str, torch.Tensor]]:
        """The groups whose adapter `layer` holds (LoRA: in `lora_A`)."""
        key = (id(layer), rows)
        if key not in self._present:
            self._present[key] = [(n, idx) for n, idx in self.groups(rows) if n in layer.lora_A]
        return self._present[key]

    def table(
        self, rows: int, groups: list[tuple[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (rows, tuple(n for n, _ in groups))
        if key not in self._tables:
            self._tables[key] = padded_groups(groups)
        return self._tables[key]


@contextmanager
def mixed_adapters(model: PeftModel, names: list[str]) -> Iterator[None]:
    """Route rows by adapter in every adapter layer and `modules_to_save` wrapper of `model` (see module doc)."""
    layers = [
        m for m in model.get_base_model().modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
    ]
    merged = [m.module_name for m in layers if isinstance(m, AdapterLayer) and m.merged]
    if merged:
        raise ValueError(f"adapter_names: unmerge first; adapters are merged into {merged[:3]}")
    plan = RowPlan(names)
    for module in layers:
        forward = _lora_forward if _segmentable(module, names) else _grouped_forward
        module.forward = _bind(forward, module, plan)
    try:
        yield
    finally:
        for module in layers:
            module.__dict__.pop("forward", None)


def _bind(fn: Any, module: nn.Module, plan: RowPlan) -> Any:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(module, plan, x, *args, **kwargs)

    return forward


def _segmentable(module: nn.Module, names: list[str]) -> bool:
    """Plain LoRA on a Linear/Conv1D for every adapter in the batch: base once, updates per group."""
    from .tuners.lora import LoraLinear

    return isinstance(module, LoraLinear) and not any(
        module.use_dora.get(n, False) for n in set(names) if n != BASE_NAME
    )


def _lora_forward(layer: Any, plan: RowPlan, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """x: (B, ..., in) -> (B, ..., out): the frozen layer on all rows plus each group's LoRA update."""
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disable_adapters:
        return result
    groups = plan.present(layer, x.shape[0])
    if not groups:
        return result
    if (
        len(groups) > 1
        and not torch.is_grad_enabled()
        and not any(layer.lora_dropout[n].training for n, _ in groups)
    ):
        A, B, scaling = _stacked(layer, [n for n, _ in groups])
        return batched_lora_(result, x, *plan.table(x.shape[0], groups), A, B, scaling)
    segments = [
        (idx, layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n], layer.lora_dropout[n])
        for n, idx in groups
    ]
    return segmented_lora(result, x, segments)


def _stacked(layer: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (n, r_max, in), B (n, out, r_max), scaling (n,)) of `names` in `layer`, ranks zero-padded; kept on the
    layer and rebuilt only when the adapters or their tensors change (tensor versions count in-place updates)."""
    pairs = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    key = tuple(
        (n, a.data_ptr(), a._version, b.data_ptr(), b._version, layer.scaling[n])
        for n, (a, b) in zip(names, pairs)
    )
    cached = layer.__dict__.get("_mixed_stack")
    if cached is None or cached[0] != key:
        r_max = max(a.shape[0] for a, _ in pairs)
        A = torch.stack(
            [torch.nn.functional.pad(a.detach(), (0, 0, 0, r_max - a.shape[0])) for a, _ in pairs]
        )
        B = torch.stack([torch.nn.functional.pad(b.detach(), (0, r_max - b.shape[1])) for _, b in pairs])
        scaling = torch.tensor([layer.scaling[n] for n in names], dtype=A.dtype, device=A.device)
        cached = layer.__dict__["_mixed_stack"] = (key, A, B, scaling)
    return cached[1:]


def _grouped_forward(module: nn.Module, plan: RowPlan, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Each group's rows through `module`'s own forward with that adapter active (base: none)."""
    own_forward = type(module).forward

    def run(name: str, rows: torch.Tensor) -> torch.Tensor:
        if isinstance(module, ModulesToSaveWrapper):
            target = module.original_module
            if not module.disable_adapters and name in module.modules_to_save:
                target = module.modules_to_save[name]
            return target(rows, *args, **kwargs)
        if name not in module.adapter_names:
            return module.base_layer(rows, *args, **kwargs)
        saved = module.active_adapters
        module.active_adapters = [name]
        try:
            return own_forward(module, rows, *args, **kwargs)
        finally:
            module.active_adapters = saved

    return grouped_apply(x, plan.groups(x.shape[0]), run)


def batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size of a model call: the first dimension of its main input, when one is recognisable."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    return args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None


@contextmanager
def mixed_call(model: PeftModel, adapter_names: Any, args: tuple, kwargs: dict[str, Any]) -> Iterator[None]:
    """`mixed_adapters` for one model call, with the whole-batch training shortcuts (fused loss, shared
    prefix: they assume every row runs the same weights) switched off for its duration."""
    names = check_adapter_names(model, adapter_names, batch_rows(args, kwargs))
    saved = {k: model.__dict__.get(k) for k in ("fused_causal_lm_loss", "shared_prefix")}
    model.fused_causal_lm_loss = model.shared_prefix = False
    try:
        with mixed_adapters(model, names):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                model.__dict__.pop(key, None)
            else:
                model.__dict__[key] = value


def from_kwargs(model: PeftModel, args: tuple, kwargs: dict[str, Any]) -> AbstractContextManager:
    """Pop `adapter_names` from a call's `kwargs`: a `mixed_call` context when given, else a no-op one."""
    names = kwargs.pop("adapter_names", None)
    return nullcontext() if names is None else mixed_call(model, names, args, kwargs)
