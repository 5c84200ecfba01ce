"""The first run: `peftkit train` with no arguments, timed as a user runs it, warm and cold (issue 13, part 4).

    python benchmarks/first_run.py [--runs warm,cold] [--repeats 1] [--no-warm-up]

warm: the embedded model already converted and the base model's held-out metrics stored by an earlier run
(the cache a user has after one run; an untimed warm-up run fills it first unless --no-warm-up). cold: a
fresh empty cache directory (`PEFTKIT_CACHE`), so the run converts the GGUF and evaluates the base model, as
the very first run after installing does. Each run is the console script in a process of its own, output in a
temporary folder; the wall time is the whole process (start to exit), the phases are the run's own
`report.json` (`phases`).
The fp32 GEMM peak (2 threads) is read before and after every run: this machine's speed drifts by 15-30%
between hours, so the peak says what speed a run got. No HF side: `peftkit train` is the reference here,
against the goal (75 s warm, 100 s cold, >= 95% held-out exact match).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import gemm_peak  # noqa: E402

GOAL = {"warm": 75.0, "cold": 100.0}
PHASES = ("startup", "model_load", "tokenize", "eval_before", "training", "eval_after", "report")


def one_run(kind: str, env: dict) -> dict:
    """Run `peftkit train` once; its wall time, report phases, exact match and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="peftkit-first-run-") as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        done = subprocess.run(
            ["peftkit", "train", "--output", str(out), "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{kind} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text())
    after = report["eval"]["exact_match_after"]
    return {
        "wall": wall,
        "phases": report["phases"],
        "exact": f"{after['correct']}/{after['total']}",
        "exact_rate": after["correct"] / after["total"],
        "rss": report["peak_rss_mb"],
        "tokens_per_s": report["tokens_per_second"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="warm,cold")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-warm-up", action="store_true", help="the cache is known to be filled already")
    a = ap.parse_args()
    print(
        "| run | GEMM peak before / after (GFLOP/s) | wall s | goal s | "
        + " | ".join(PHASES)
        + " | exact match | tok/s | peak RSS MB |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|---:|")
    if "warm" in a.runs.split(",") and not a.no_warm_up:
        one_run("warm-up", dict(os.environ))  # fills the cache (conversion, base metrics) if it is not yet
    for kind in a.runs.split(","):
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory(prefix="peftkit-cold-cache-") as cold_cache:
                env = {**os.environ, **({"PEFTKIT_CACHE": cold_cache} if kind == "cold" else {})}
                before = gemm_peak(2)[0] / 1e9
                r = one_run(kind, env)
                after = gemm_peak(2)[0] / 1e9
            phases = " | ".join(f"{r['phases'].get(p, 0.0):.1f}" for p in PHASES)
            met = "met" if r["wall"] <= GOAL[kind] and r["exact_rate"] >= 0.95 else "not met"
            print(
                f"| {kind} | {before:.0f} / {after:.0f} | {r['wall']:.1f} | {GOAL[kind]:.0f} ({met}) | {phases} | "
                f"{r['exact']} | {r['tokens_per_s']:.0f} | {r['rss']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
