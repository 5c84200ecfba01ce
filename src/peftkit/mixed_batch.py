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
from torch.optim.optimizer import register_optimizer_step_post_hook

from .functional.segmented import (
    batched_lora_,
    blocked_linear_lora,
    blocked_lora_,
    gathered_linear_lora,
    grouped_apply,
    padded_groups,
    row_groups,
    segmented_lora,
)
from .generate_settings import settings
from .inference_fold import decodes_in_major, has_room
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

    def __init__(self, names: list[str], keep_layout: bool = False) -> None:
        self.names = names
        self.keep_layout = keep_layout  # see mixed_adapters
        self._groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._present: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
        self._blocks: dict[int, int | None] = {}
        self._block_stacks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

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

    def blocks(self, rows: int) -> int | None:
        """The number of groups when the rows of every group are one contiguous block and all blocks have the
        same size (then x.view(groups, -1, in) splits the batch by adapter without a gather; one group: the
        whole batch); else None."""
        if rows not in self._blocks:
            groups = self.groups(rows)
            per = rows // len(groups)
            contiguous = all(
                len(idx) == per and bool((idx == torch.arange(g * per, (g + 1) * per)).all())
                for g, (_, idx) in enumerate(groups)
            )
            self._blocks[rows] = len(groups) if contiguous else None
        return self._blocks[rows]

    def block_stack(self, layer: Any, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T (g, in, r_max), scaled B^T (g, r_max, out)) of every group in row order, zeros for a group whose
        adapter `layer` does not hold (or `__base__`); built once per layer for this call."""
        key = (id(layer), rows)
        if key not in self._block_stacks:
            names = [n for n, _ in self.groups(rows)]
            self._block_stacks[key] = _cached(layer, "_mixed_blocks", names, _block_stacked)
        return self._block_stacks[key]


@contextmanager
def mixed_adapters(model: PeftModel, names: list[str], keep_layout: bool = False) -> Iterator[None]:
    """Route rows by adapter in every adapter layer and `modules_to_save` wrapper of `model` (see module doc).

    `keep_layout`: the (in, out)-contiguous copies of the frozen weights that decode steps multiply faster by
    (`_fast_entry`) stay on the layers after the context ends, for the next context to reuse (a server that
    re-enters one per change of its batch); by default they are freed with the context."""
    layers = [
        m for m in model.get_base_model().modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
    ]
    merged = [m.module_name for m in layers if isinstance(m, AdapterLayer) and m.merged]
    if merged:
        raise ValueError(f"adapter_names: unmerge first; adapters are merged into {merged[:3]}")
    plan = RowPlan(names, keep_layout)
    for module in layers:
        if _segmentable(module, names):
            module.forward = _bind_lora(module, plan)
        else:
            module.forward = _bind(_grouped_forward, module, plan)
    try:
        yield
    finally:
        for module in layers:
            module.__dict__.pop("forward", None)


def _bind(fn: Any, module: nn.Module, plan: RowPlan) -> Any:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(module, plan, x, *args, **kwargs)

    return forward


def _bind_lora(layer: Any, plan: RowPlan) -> Any:
    """`_lora_forward` on `layer`, with a fast path for repeated no-grad calls of one batch size (decode steps).

    The first no-grad call with `rows` rows runs the full path and decides whether the layer is exactly the
    frozen Linear plus the groups' LoRA updates (`_fast_ok`); the second such call (the first decode step of
    `generate`; a single forward never gets there) keeps that layer's tensors (`_fast_entry`) and every call
    from then on runs `blocked_linear_lora` (rows in equal blocks by adapter) or `gathered_linear_lora` (any
    other order) on them with no lookups. The state lives in this closure, i.e. for
    one `mixed_adapters` context (one forward or generate call), while adapters and weights cannot change;
    grad mode and the input dtype are checked on every call (with grad on, the full path runs)."""
    # rows -> False (no), True (yes, not built yet) or the entry (function, tensors)
    fast: dict[int, Any] = {}

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or torch.is_grad_enabled():
            return _lora_forward(layer, plan, x, *args, **kwargs)
        rows = x.shape[0]
        entry = fast.get(rows)
        if entry is None:
            fast[rows] = _fast_ok(layer, plan, x)
        elif entry is True:
            entry = fast[rows] = _fast_entry(layer, plan, rows)
        if type(entry) is tuple and x.dtype == entry[1][0].dtype:
            return entry[0](x, *entry[1])
        return _lora_forward(layer, plan, x)

    return forward


def _fast_ok(layer: Any, plan: RowPlan, x: torch.Tensor) -> bool:
    """Whether no-grad `layer` on x (rows, ..., in) is exactly the frozen `nn.Linear` (no hooks, x's dtype, no
    autocast) plus the LoRA updates of its row groups, every adapter present dropout-free."""
    if layer.disable_adapters or type(layer.base_layer) is not nn.Linear:
        return False
    groups = plan.present(layer, x.shape[0])
    return bool(groups) and layer._inference_plain([n for n, _ in groups], x)


def _fast_entry(layer: Any, plan: RowPlan, rows: int) -> tuple:
    """(function, its tensors after x): `blocked_linear_lora` with (weight^T (in, out), bias, At, Bt) when the
    rows form equal blocks by adapter, else `gathered_linear_lora` with (weight^T, bias, A, B, scaling, table,
    valid). weight^T: see `_transposed`."""
    wt, bias = _transposed(layer, rows, plan.keep_layout), layer.base_layer.bias
    if plan.blocks(rows) is not None:
        return blocked_linear_lora, (wt, bias, *plan.block_stack(layer, rows))
    groups = plan.present(layer, rows)
    return gathered_linear_lora, (
        wt,
        bias,
        *_stacked(layer, [n for n, _ in groups]),
        *plan.table(rows, groups),
    )


def _transposed(layer: Any, rows: int, keep: bool) -> torch.Tensor:
    """The frozen weight as (in, out): a contiguous copy when a decode step of `rows` rows multiplies faster
    from it (`inference_fold.decodes_in_major`, the rule the LoRA fold's layout follows) and there is room
    (`inference_fold.has_room`), else the transposed view. With `keep` the copy stays on the layer (slot
    `_mixed_wt`, rebuilt when the weight changes) for later calls; else it lives as long as the caller's entry."""
    w = layer.base_layer.weight.detach()
    if not decodes_in_major(rows, w.device):
        return w.T
    key = (w.data_ptr(), w._version)
    kept = layer.__dict__.get("_mixed_wt")
    if kept is not None and kept[0] == key:
        return kept[1]
    if not has_room(w.numel() * w.element_size(), w.device):
        return w.T
    wt = w.T.contiguous()
    if keep:
        layer.__dict__["_mixed_wt"] = (key, wt)
    return wt


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
    inference = not torch.is_grad_enabled() and not any(layer.lora_dropout[n].training for n, _ in groups)
    blocks = plan.blocks(x.shape[0]) if inference else None
    if blocks is not None and result.is_contiguous():
        A, B = plan.block_stack(layer, x.shape[0])
        return blocked_lora_(result, x, A, B)
    if len(groups) > 1 and inference:
        A, B, scaling = _stacked(layer, [n for n, _ in groups])
        return batched_lora_(result, x, *plan.table(x.shape[0], groups), A, B, scaling)
    segments = [
        (idx, layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n], layer.lora_dropout[n])
        for n, idx in groups
    ]
    return segmented_lora(result, x, segments)


_STACK_SLOTS = ("_mixed_stack", "_mixed_blocks", "_mixed_wt")
_optimizer_steps = 0  # every torch optimizer step in this process, once `_watch_optimizers` has run
_step_hook: Any = None


def _count_step(*_: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _watch_optimizers() -> None:
    """Count optimizer steps from now on (a global post-step hook on every torch optimizer): fused optimizers
    (`AdamW(fused=True)`) update parameters in place without bumping their `_version`, which the stacks' key
    alone would miss."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_step)


def drop_stacks(model: nn.Module) -> None:
    """Forget every layer's stacked adapter factors (rebuilt by the next mixed call): for writes through
    `.data`, which neither the tensors' versions nor an optimizer step show (e.g. loading adapter tensors)."""
    for module in model.modules():
        for slot in _STACK_SLOTS:
            module.__dict__.pop(slot, None)


def _cached(layer: Any, slot: str, names: list[str], build: Any) -> Any:
    """`build(layer, names)`, kept on the layer under `slot` and rebuilt only when the adapters or their tensors
    change: data pointers and tensor versions count in-place updates, the optimizer-step count the fused
    optimizers' updates that leave `_version` alone; `.data` writes call `drop_stacks`."""
    _watch_optimizers()
    key = tuple(
        (n, a.data_ptr(), a._version, b.data_ptr(), b._version, layer.scaling[n])
        for n in names
        if n in layer.lora_A
        for a, b in [(layer.lora_A[n].weight, layer.lora_B[n].weight)]
    ) + (tuple(names), _optimizer_steps)
    cached = layer.__dict__.get(slot)
    if cached is None or cached[0] != key:
        cached = layer.__dict__[slot] = (key, build(layer, names))
    return cached[1]


def _stacked(layer: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (n, r_max, in), B (n, out, r_max), scaling (n,)) of `names` in `layer`, ranks zero-padded (cached)."""
    return _cached(layer, "_mixed_stack", names, _build_stacked)


def _build_stacked(layer: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names]
    r_max = max(a.shape[0] for a, _ in pairs)
    A = torch.stack([torch.nn.functional.pad(a.detach(), (0, 0, 0, r_max - a.shape[0])) for a, _ in pairs])
    B = torch.stack([torch.nn.functional.pad(b.detach(), (0, r_max - b.shape[1])) for _, b in pairs])
    scaling = torch.tensor([layer.scaling[n] for n in names], dtype=A.dtype, device=A.device)
    return A, B, scaling


def _block_stacked(layer: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^T (g, in, r_max), (scaling * B)^T (g, r_max, out)), contiguous, for the groups `names` (zeros where
    `layer` lacks one)."""
    held = [n for n in names if n in layer.lora_A]
    first = layer.lora_A[held[0]].weight
    r_max = max(layer.lora_A[n].weight.shape[0] for n in held)
    d_in, d_out = first.shape[1], layer.lora_B[held[0]].weight.shape[0]
    At = first.new_zeros((len(names), d_in, r_max))
    Bt = first.new_zeros((len(names), r_max, d_out))
    for g, name in enumerate(names):
        if name in held:
            a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
            At[g, :, : a.shape[0]] = a.T
            Bt[g, : b.shape[1]] = (b * layer.scaling[name]).T
    return At, Bt


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
def mixed_call(
    model: PeftModel, adapter_names: Any, args: tuple, kwargs: dict[str, Any], keep_layout: bool = False
) -> Iterator[None]:
    """`mixed_adapters` for one model call (or several calls with the same rows: a server's decode steps),
    with the whole-batch training shortcuts (fused loss, shared prefix: they assume every row runs the same
    weights) switched off for its duration."""
    names = check_adapter_names(model, adapter_names, batch_rows(args, kwargs))
    saved = {k: model.__dict__.get(k) for k in ("fused_causal_lm_loss", "shared_prefix")}
    model.fused_causal_lm_loss = model.shared_prefix = False
    try:
        with mixed_adapters(model, names, keep_layout):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                model.__dict__.pop(key, None)
            else:
                model.__dict__[key] = value


def generate(model: PeftModel, generate_fn: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """`generate_fn(*args, **kwargs)` with `adapter_names` popped from `kwargs` (one per prompt).

    The prompts are reordered so that each adapter's rows are one contiguous block (every per-row tensor
    argument alike), generated, and the output rows put back in the caller's order: with blocks of equal size
    each layer adds its LoRA updates with two batched matmuls on views, no gather. Where the reordering could
    be visible (a streamer, dict outputs, positional arguments, a per-row argument it cannot identify) the
    rows keep their order."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return generate_fn(*args, **kwargs)
    rows = batch_rows(args, kwargs)
    names = check_adapter_names(model, names, None)
    order = _block_order(names) if rows == len(names) and _reorderable(model, args, kwargs, rows) else None
    if order is None:
        with mixed_call(model, names, args, kwargs):
            return generate_fn(*args, **kwargs)
    index = torch.tensor(order)
    moved = {k: _take_rows(v, index, rows) for k, v in kwargs.items()}
    with mixed_call(model, [names[i] for i in order], args, moved):
        out = generate_fn(*args, **moved)
    per = out.shape[0] // rows  # num_return_sequences: each prompt's outputs are consecutive
    back = (torch.argsort(index).view(-1, 1) * per + torch.arange(per)).reshape(-1)
    return out.index_select(0, back.to(out.device))


def _block_order(names: list[str]) -> list[int] | None:
    """Row order putting each adapter's rows together (first appearance order, stable); None when already so."""
    first = {n: i for i, n in reversed(list(enumerate(names)))}
    order = sorted(range(len(names)), key=lambda i: first[names[i]])
    return None if order == list(range(len(names))) else order


# generate() arguments that see row positions (callbacks get the batch index, a streamer the rows in order)
_ROW_AWARE = (
    "streamer",
    "prefix_allowed_tokens_fn",
    "logits_processor",
    "stopping_criteria",
    "assistant_model",
)


def _reorderable(model: PeftModel, args: tuple, kwargs: dict[str, Any], rows: int | None) -> bool:
    if args or rows is None or any(kwargs.get(k) is not None for k in _ROW_AWARE):
        return False
    if settings(model, kwargs)("return_dict_in_generate", False):
        return False
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return all(t.shape[0] == rows for t in tensors)


def _take_rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value.index_select(0, index.to(value.device))
    return value


def from_kwargs(model: PeftModel, args: tuple, kwargs: dict[str, Any]) -> AbstractContextManager:
    """Pop `adapter_names` from a call's `kwargs`: a `mixed_call` context when given, else a no-op one."""
    names = kwargs.pop("adapter_names", None)
    return nullcontext() if names is None else mixed_call(model, names, args, kwargs)
