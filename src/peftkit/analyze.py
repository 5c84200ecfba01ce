"""What an adapter changed: per layer and module, the size and shape of its weight update ΔW.

For every adapter layer of a model and one adapter name, with W the frozen base weight (out, in) and ΔW the
update the adapter makes to it (merged weight − W; for plain LoRA ΔW = s·B·A, B (out, r), A (r, in)):

- ``norm``: ‖ΔW‖_F; ``relative``: ‖ΔW‖_F / ‖W‖_F;
- ``effective_rank``: exp of the entropy of the normalized singular values p_i = σ_i / Σσ (Roy & Vetterli);
  1 for a rank-1 update, r for r equal singular values;
- ``stable_rank``: ‖ΔW‖_F² / ‖ΔW‖_2² = Σσ² / σ_max² (at most the rank);
- ``cosine`` between two adapters' updates of the same module: ⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F ‖ΔW₂‖_F).

Plain LoRA layers are analysed through their factors (QR of B and Aᵀ, then the SVD of an r×r matrix), so a
SmolLM2-sized adapter takes well under a second; every other method with a weight update (DoRA, LoHa, LoKr,
OFT, BOFT, VeRA, AdaLoRA, IA3, ...) through its dense ΔW from the layer's own `merge_weight`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tuners.base import AdapterLayer

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class ModuleDelta:
    """ΔW of one module: dense (out, in) or low-rank factors `left` (out, r) @ `right` (r, in)."""

    name: str
    base_norm: float
    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        """The dense ΔW, 2-D (a conv kernel flattened to (out, in·k·k))."""
        if self.dense is not None:
            return self.dense
        return self.left @ self.right

    def norm(self) -> float:
        """‖ΔW‖_F (for factors: sqrt(Σ (LᵀL) ∘ (R Rᵀ)), r×r products only)."""
        if self.dense is not None:
            return float(self.dense.norm())
        gram = (self.left.T @ self.left) * (self.right @ self.right.T)
        return float(gram.sum().clamp_min(0)) ** 0.5

    def singular_values(self) -> torch.Tensor:
        """σ of ΔW, descending; through r×r matrices for factors."""
        if self.dense is not None:  # eigenvalues of the smaller Gram matrix (float64): several times faster
            d = self.dense.double()
            gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
            return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
        _, r_left = torch.linalg.qr(self.left)  # left = Q_l R_l, (r, r)
        _, r_right = torch.linalg.qr(self.right.T)  # rightᵀ = Q_r R_r
        return torch.linalg.svdvals(r_left @ r_right.T)


def split_name(module: str) -> tuple[int | None, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "self_attn.q_proj"); (None, name) without a layer index."""
    match = _LAYER.search(module)
    if match is None:
        return None, module
    return int(match.group(1)), module[match.end() :]


def module_deltas(model: nn.Module, adapter_name: str) -> list[ModuleDelta]:
    """The update of `adapter_name` in every adapter layer of `model` that holds it (float32, on CPU)."""
    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer) or adapter_name not in layer.adapter_names:
            continue
        if getattr(layer.base_layer, "weight", None) is None:
            continue
        layer = _whole_layer(layer)
        weight = layer.base_layer.weight
        base = weight.detach().float()
        clean = name.removeprefix("base_model.model.")
        factors = _lora_factors(layer, adapter_name)
        if factors is not None:
            out.append(ModuleDelta(clean, float(base.norm()), left=factors[0], right=factors[1]))
            continue
        try:
            with torch.no_grad():
                merged, _ = layer.merge_weight(weight.detach().clone(), adapter_name)
        except NotImplementedError:
            continue  # a method without a weight update here
        delta = (
            (merged.float() - base).reshape(base.shape[0], -1) if base.dim() > 1 else merged.float() - base
        )
        out.append(
            ModuleDelta(clean, float(base.norm()), dense=delta if delta.dim() == 2 else delta[:, None])
        )
    return out


def _lora_factors(layer: AdapterLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s·B (out, r), A (r, in)) of a plain LoRA (or rsLoRA) Linear/Conv1D layer, else None."""
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is None or name not in lora_a or getattr(layer, "use_dora", {}).get(name):
        return None
    if not isinstance(lora_a[name], nn.Linear):  # AdaLoRA's SVD triplets, conv kernels: the dense path
        return None
    a, b = lora_a[name].weight.detach().float(), layer.lora_B[name].weight.detach().float()
    return b * float(layer.scaling[name]), a


def _whole_layer(layer: AdapterLayer) -> AdapterLayer:
    """`layer` itself, or for one whose tensors FSDP2 sharded (DTensors) a copy holding the whole tensors
    (`full_tensor()`: a collective, so every process of the group must walk the same layers in the same order;
    one layer's weights at a time, never the whole model)."""
    if not any(callable(getattr(p, "full_tensor", None)) for p in layer.parameters()):
        return layer
    whole = copy.deepcopy(layer)
    for module in whole.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and callable(getattr(p, "full_tensor", None)):
                module._parameters[key] = nn.Parameter(p.full_tensor().detach(), requires_grad=False)
    return whole


def delta_stats(delta: ModuleDelta) -> dict[str, Any]:
    """{layer, module, norm, relative, effective_rank, stable_rank} of one module's ΔW."""
    sigma = delta.singular_values().double()
    norm = float(sigma.pow(2).sum().sqrt())
    positive = sigma[sigma > sigma.max() * 1e-12] if norm > 0 else sigma[:0]
    if len(positive):
        p = positive / positive.sum()
        effective = math.exp(float(-(p * p.log()).sum()))
        stable = float(sigma.pow(2).sum() / sigma.max() ** 2)
    else:
        effective = stable = 0.0
    layer, module = split_name(delta.name)
    return {
        "name": delta.name,
        "layer": layer,
        "module": module,
        "norm": norm,
        "relative": norm / delta.base_norm if delta.base_norm else float("nan"),
        "effective_rank": effective,
        "stable_rank": stable,
    }


def cosine(first: ModuleDelta, second: ModuleDelta) -> float:
    """⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F ‖ΔW₂‖_F); through r×r products when both are factored."""
    if first.dense is None and second.dense is None:
        # tr((L1 R1)ᵀ L2 R2) = Σ (L1ᵀ L2) ∘ (R1 R2ᵀ)
        inner = float(((first.left.T @ second.left) * (first.right @ second.right.T)).sum())
        n1 = float(((first.left.T @ first.left) * (first.right @ first.right.T)).sum()) ** 0.5
        n2 = float(((second.left.T @ second.left) * (second.right @ second.right.T)).sum()) ** 0.5
    else:
        m1, m2 = first.matrix(), second.matrix()
        if m1.shape != m2.shape:
            raise ValueError(
                f"{first.name}: the two updates differ in shape ({tuple(m1.shape)} vs {tuple(m2.shape)})"
            )
        inner, n1, n2 = float((m1 * m2).sum()), float(m1.norm()), float(m2.norm())
    return inner / (n1 * n2) if n1 and n2 else float("nan")


def analyze(model: nn.Module, adapter_name: str, compare_with: str | None = None) -> list[dict[str, Any]]:
    """One row of `delta_stats` per module of `adapter_name`, plus "cosine" with `compare_with`'s update of the
    same module when given (None where that adapter does not touch the module)."""
    deltas = module_deltas(model, adapter_name)
    if not deltas:
        raise ValueError(f"adapter {adapter_name!r} has no module with a weight update to analyze")
    others = {d.name: d for d in module_deltas(model, compare_with)} if compare_with else {}
    rows = []
    for delta in deltas:
        row = delta_stats(delta)
        if compare_with:
            other = others.get(delta.name)
            row["cosine"] = cosine(delta, other) if other is not None else None
        rows.append(row)
    return rows


def largest_change(model: nn.Module, adapter_name: str) -> dict[str, Any] | None:
    """{name, layer, module, relative} of the module whose ‖ΔW‖/‖W‖ is largest (norms only, no SVD); None when
    the adapter has no weight update (prompt-learning methods)."""
    best = None
    for delta in module_deltas(model, adapter_name):
        relative = delta.norm() / delta.base_norm if delta.base_norm else 0.0
        if best is None or relative > best["relative"]:
            layer, module = split_name(delta.name)
            best = {"name": delta.name, "layer": layer, "module": module, "relative": relative}
    return best


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table, one line per module."""
    compare = any("cosine" in r for r in rows)
    head = f"{'layer':>5}  {'module':<24} {'|dW|_F':>10} {'|dW|/|W|':>10} {'eff.rank':>9} {'stable':>8}"
    lines = [head + (f" {'cosine':>8}" if compare else "")]
    for r in rows:
        layer = "-" if r["layer"] is None else str(r["layer"])
        line = (
            f"{layer:>5}  {r['module']:<24} {r['norm']:>10.4g} {r['relative']:>10.4g} "
            f"{r['effective_rank']:>9.3f} {r['stable_rank']:>8.3f}"
        )
        if compare:
            line += f" {'-' if r.get('cosine') is None else format(r['cosine'], '8.4f'):>8}"
        lines.append(line)
    return "\n".join(lines)


def heatmap(rows: list[dict[str, Any]], path: str, value: str = "relative", title: str | None = None) -> None:
    """A PNG heatmap of `value` (layers × modules) at `path` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    modules = list(dict.fromkeys(r["module"] for r in rows if r["layer"] is not None))
    if not layers:
        raise ValueError("no per-layer modules to plot")
    grid = np.full((len(layers), len(modules)), np.nan)
    for r in rows:
        if r["layer"] is not None and r.get(value) is not None:
            grid[layers.index(r["layer"]), modules.index(r["module"])] = r[value]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.2 + 0.25 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title or value)
    fig.colorbar(image, ax=ax, label=value)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
