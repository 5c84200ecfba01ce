"""The end-of-run artifacts: report.json, report.md and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.train.checkpoint import write_json_atomic, write_text_atomic


def adapter_size_bytes(folder: Path) -> int:
    """Bytes of the adapter weight files in ``folder``."""
    return sum(p.stat().st_size for p in folder.glob("adapter_model.*") if p.is_file())


def _fmt_em(em: dict | None) -> str:
    return "n/a" if em is None else f"{em['exact_match']:.1%} ({em['correct']}/{em['total']})"


def _fmt_phases(phases: dict) -> str:
    """`- seconds by phase: startup 8.1, model_load 2.0, ...` (report.json's `phases`)."""
    parts = ", ".join(f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in phases.items())
    return f"- seconds by phase: {parts}"


def _fmt_load(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.1f}"


def render_markdown(r: dict) -> str:
    """A human summary of a finished run."""
    ev = r.get("eval") or {}
    lines = [
        "# peftkit train report",
        "",
        f"- base model: `{r['model']}`",
        f"- method: {r['method']} (r={r['r']}, alpha={r['alpha']}, targets: {', '.join(r['target_modules'])})",
        f"- trainable params: {r['trainable_params']:,} of {r['total_params']:,} ({r['trainable_percent']:.3f}%)",
        f"- adapter size on disk: {r['adapter_bytes'] / 1e6:.2f} MB",
        f"- steps: {r['steps']} ({r['train_rows']} training rows, {r['tokens']:,} tokens)",
        f"- batch: {r['batch_size']} rows per process x {r['global_batch'] // (r['batch_size'] * r['processes'])}"
        f" accumulated x {r['processes']} process(es) ({r['distributed']}) = {r['global_batch']} rows per step"
        if "processes" in r
        else "",
        f"- wall time: {r['wall_seconds']:.0f} s (training {r['train_seconds']:.0f} s)",
        *([_fmt_phases(r["phases"])] if r.get("phases") else []),
        f"- throughput: {r['tokens_per_second']:.0f} training tokens/s on {r['threads']} thread(s)",
        f"- CPU time: {r['cpu_seconds']:.0f} s (load average at the end: {_fmt_load(r['load_average'])})",
        f"- peak memory (RSS): {r['peak_rss_mb']:.0f} MB",
        f"- final train loss: {r['final_train_loss']:.4f}"
        if r.get("final_train_loss") is not None
        else "- final train loss: n/a",
    ]
    if ev:
        lines.append(
            f"- eval loss: {_fmt_loss(ev['before'])} -> {ev['after']['loss']:.4f} (perplexity {ev['after']['perplexity']:.2f})"
        )
        lines.append(
            f"- held-out exact match: {_fmt_em(ev.get('exact_match_before'))} -> {_fmt_em(ev.get('exact_match_after'))}"
        )
        if r.get("eval_before_cached"):
            lines.append(
                f"- the base model's metrics were measured by an earlier run ({r['eval_before_cached']}) on the same "
                "model files, rows and settings, and read from the cache (--no-eval-cache measures them again)"
            )
    if r.get("largest_change"):
        c = r["largest_change"]
        where = (
            f"layer {c['layer']} module {c['module']}" if c["layer"] is not None else f"module {c['module']}"
        )
        lines.append(f"- the adapter changed the model most at {where} (‖ΔW‖/‖W‖ = {c['relative']:.3g})")
    lines += ["", f"Adapter: `{r['output']}` (load with `PeftModel.from_pretrained(base, path)`)."]
    if r.get("plot_note"):
        lines.append(r["plot_note"])
    return "\n".join(lines) + "\n"


def largest_change(model, adapter_name: str = "default") -> dict | None:
    """Where the trained adapter changed the model most (peftkit.analyze), for the report."""
    from peftkit.analyze import largest_change as find

    return find(model, adapter_name)


def _fmt_loss(loss: dict | None) -> str:
    return "not measured" if loss is None else f"{loss['loss']:.4f}"


def write_reports(output: Path, report: dict) -> str:
    """Write report.json and report.md atomically; return the markdown."""
    md = render_markdown(report)
    write_json_atomic(output / "report.json", report)
    write_text_atomic(output / "report.md", md)
    return md


def plot_loss_curve(metrics_path: Path, png_path: Path) -> str | None:
    """Plot train (and eval) loss from metrics.jsonl; returns a note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Loss curve skipped: matplotlib is not installed (pip install matplotlib)."
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(png_path)
    return None
