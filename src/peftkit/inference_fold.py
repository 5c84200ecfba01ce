"""Inference with LoRA folded into a scratch copy of the weight: `F.linear(x, W + s·B·A, bias)`.

Without grad and without active dropout a plain LoRA Linear is exactly the linear map with the effective
weight W_eff = W + sum_k s_k B_k A_k (up to fp32 rounding; greedy generations are token for token those of
the unfolded layer, see tests/perf/test_inference_fold.py). Generation runs the same layer once per new
token: folded, each step is one GEMM per layer, as fast as the plain model, instead of the base GEMM plus
the two skinny rank-r GEMMs, a scaling and an add (five ops and their Python dispatch per layer and token).

The fold is used only inside `generating()`, where the weights cannot change: `PeftModel.generate`, and
`peftkit train`'s held-out pass (`train/held_out.py`: one fold serves its loss, its exact match and every
batch). Each such call first checks the adapter tensors against copies taken when the fold was built
(r·(in+out) numbers per layer; fused optimizers update parameters in place without bumping `_version`, so the
key alone is not enough). A plain no-grad forward (an evaluation loss, Trainer's eval loop) runs unfolded.

W_eff is a new tensor kept on the layer (`layer.__dict__["_inference_fold"]`): the base weight is never
changed, so "undoing" the fold is dropping that tensor and nothing can drift. It is used only when
- grad is disabled (`torch.no_grad()` / `inference_mode()`), so no gradient path ever sees it;
- every active adapter of the layer is plain LoRA (no DoRA, no lora_bias) with no dropout active right now
  (p == 0 or eval mode), on an `nn.Linear` / `Conv1D` without hooks, all in x's dtype, no autocast;
- the layer is not routing a mixed-adapter batch (`mixed_batch` binds its own `forward` on the layer).
It is rebuilt when it no longer matches its key: the active adapter names, their scalings, and the identity
(`data_ptr`) and in-place version (`_version`, bumped by optimizer steps and `load_state_dict`) of W, every
A and every B. It is dropped (memory freed) by `train()`, `set_adapter`, `merge`/`unmerge`, enabling or
disabling adapters, `set_requires_grad`, deleting an adapter and loading adapter tensors (which writes
through `.data`, invisible to `_version`). Anyone else writing into those tensors through `.data` must call
`drop_folds(model)`.

Cost: one (out, in) copy per adapted layer while folded (~0.4 GiB fp32 for SmolLM2-135M with LoRA on every
linear layer) and 2·out·in·r flops to build it. A copy is made only while the device keeps `RESERVE` (a
quarter) of its memory free afterwards (`has_room`; /proc/meminfo on the CPU, `mem_get_info` on CUDA, never
elsewhere), so a model that barely fits runs unfolded instead of running out of memory. Switch off: `peftkit.set_inference_fold(False)` (then `drop_folds(model)` frees the copies).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .functional.lora_merged import effective_weight

_ATTR = "_inference_fold"
# (the generate call's set in _calls, the folded weight, whether it is (in, out)-contiguous): see current_fold
_FAST = "_inference_fold_call"
_enabled = True


def set_inference_fold(enabled: bool) -> None:
    """Switch folding LoRA into a scratch weight for no-grad inference on (default) or off for every model."""
    global _enabled
    _enabled = bool(enabled)


def drop_fold(layer: nn.Module) -> None:
    """Forget `layer`'s folded weight (the next eligible call rebuilds it)."""
    layer.__dict__.pop(_ATTR, None)
    layer.__dict__.pop(_FAST, None)


def drop_folds(model: nn.Module) -> None:
    """Forget every folded weight in `model`."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)
        module.__dict__.pop(_FAST, None)


def current_fold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The folded weight `layer` already checked in the `generate` call in progress, or None.

    The fast path of every decode step after the first: nothing the checks in `folded_weight` look at (active
    adapters, their tensors and scalings, dropout, dtypes, hooks) changes while one `generate` call runs, so
    the second and later tokens skip them (~20 us per layer and token in Python, ~4 ms per token for the 210
    adapted layers of SmolLM2-135M). What is left is the layout check, ~1.5 us (the fold's own layout is
    remembered with it: working it out took another 2.4 us per call)."""
    entry = layer.__dict__.get(_FAST)
    if entry is None or not _calls or entry[0] is not _calls[-1] or torch.is_grad_enabled():
        return None
    want = _in_major(x, entry[1].device)
    return entry[1] if want is None or want == entry[2] else None  # else: rebuilt in the other layout


def decodes_in_major(rows: int, device: torch.device) -> bool:
    """Whether a decode step of `rows` rows (one token each) multiplies faster by a weight stored
    (in, out)-contiguous than by the (out, in) one F.linear is given (see IN_MAJOR_ROWS). Used for the fold here
    and for the base weight of a mixed-adapter batch (`mixed_batch`)."""
    return device.type == "cpu" and rows >= IN_MAJOR_ROWS


def _in_major(x: torch.Tensor, device: torch.device, prefill: bool = False) -> bool | None:
    """The layout a decode step x (batch, 1, in) or (rows, in) wants (True: (in, out)-contiguous); for a prefill
    (batch, seq > 1, in), which runs as fast from either layout, None, or with `prefill=True` the layout its
    batch will decode in (what to build a new fold in)."""
    if x.dim() > 2 and x.shape[-2] > 1 and not prefill:
        return None
    return x.dim() > 1 and decodes_in_major(x.shape[0], device)


def _is_in_major(w_eff: torch.Tensor) -> bool:
    return w_eff.dim() == 2 and w_eff.T.is_contiguous() and not w_eff.is_contiguous()


def is_folded(layer: nn.Module) -> bool:
    """Whether `layer` currently holds a folded weight."""
    cached = layer.__dict__.get(_ATTR)
    return cached is not None and cached[1] is not None


def folded_weight(layer: Any, names: list[str], x: torch.Tensor) -> torch.Tensor | None:
    """The folded (out, in) weight of LoRA Linear `layer` for its unmerged active adapters `names` on input x
    (..., in), or None when the fold does not apply (the caller runs the unfolded path)."""
    if not (_enabled and names and _calls) or torch.is_grad_enabled() or "forward" in layer.__dict__:
        return None
    w = layer.base_layer.weight
    if w.requires_grad or not layer._inference_plain(names, x):
        return None
    pairs = [(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n]) for n in names]
    key = (
        tuple(names),
        w.data_ptr(),
        w._version,
        tuple((a.data_ptr(), a._version, b.data_ptr(), b._version, s) for a, b, s in pairs),
    )
    cached = layer.__dict__.get(_ATTR)
    call = _calls[-1]
    want = _in_major(x, w.device)
    if (
        cached is not None
        and cached[0] == key
        and (want is None or cached[1] is None or want == _is_in_major(cached[1]))
        and (id(layer) in call or _same(cached[2], pairs))
    ):
        call.add(id(layer))
        if cached[1] is not None:
            layer.__dict__[_FAST] = (call, cached[1], _is_in_major(cached[1]))
        return cached[1]
    layer.__dict__.pop(_ATTR, None)  # free the stale copy before building the new one
    layer.__dict__.pop(_FAST, None)
    w_eff = None  # no room for the copy: remembered (under this key) as "run unfolded"
    if has_room(w.numel() * w.element_size(), w.device):
        w_eff = effective_weight(
            layer._weight_rows().detach(),
            [(a.detach(), b.detach(), s) for a, b, s in pairs],
            _in_major(x, w.device, prefill=True),
        )
    layer.__dict__[_ATTR] = (key, w_eff, [(a.detach().clone(), b.detach().clone()) for a, b, _ in pairs])
    call.add(id(layer))
    if w_eff is not None:
        layer.__dict__[_FAST] = (call, w_eff, _is_in_major(w_eff))
    return w_eff


# From this many rows in a decode step (one token per row) the CPU fold is stored (in, out)-contiguous and
# F.linear gets its (out, in) view: MKL's small-M GEMM is much faster from that layout. Measured on SmolLM2's
# shapes (2 threads, one decoder layer's 7 products, us):
# 1 row 358 (out, in) vs 424 (in, out); 2 rows 552 vs 615; 4 rows 1649 vs 578; 8 1734 vs 694; 16 3361 vs 776;
# 32 4025 vs 1586; 64 2872 vs 2834; 3200 (a prefill) 107543 vs 108743. A prefill takes the fold as it is; a
# decode step that wants the other layout rebuilds it (once per change of batch class).
IN_MAJOR_ROWS = 3

# One entry per `generate` call in progress: the layers whose fold was checked against its adapter tensors in
# that call. The fold is used only inside `generating()`: the tensors cannot change while generating, and
# every call first compares them with the copies the fold was built from (fused optimizers update parameters
# in place without bumping `_version`, so the key alone can miss a training step).
_calls: list[set[int]] = []


@contextmanager
def generating() -> Iterator[None]:
    """Let no-grad LoRA Linear layers run folded for the duration of one `generate` call (or evaluation pass)."""
    _calls.append(set())
    try:
        yield
    finally:
        _calls.pop()


def _same(snapshot: list[tuple[torch.Tensor, torch.Tensor]], pairs: list) -> bool:
    return len(snapshot) == len(pairs) and all(
        torch.equal(a0, a) and torch.equal(b0, b) for (a0, b0), (a, b, _) in zip(snapshot, pairs)
    )


# The fold is a speed-up, never a reason to run out of memory: a copy is made only while the device keeps this
# fraction of its memory free afterwards (so a model that barely fits runs unfolded, as it did before).
RESERVE = 0.25


def has_room(nbytes: int, device: torch.device) -> bool:
    """Whether `device` has `nbytes` to spare and still RESERVE of its memory free (unknown: no)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    elif device.type == "cpu":
        free, total = _host_memory()
    else:
        return False
    return free is not None and free - nbytes > RESERVE * total


def _host_memory() -> tuple[int | None, int | None]:
    """(available, total) bytes of this machine's RAM from /proc/meminfo (Linux), else (None, None)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None
