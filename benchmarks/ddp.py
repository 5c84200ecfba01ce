"""Data-parallel scaling of ``peftkit train``: samples/s of 1 process vs N processes (torchrun, DDP or FSDP2).

    python benchmarks/ddp.py                       # the embedded SmolLM2-135M-Instruct, 20 steps, global batch 8
    python benchmarks/ddp.py --tiny --steps 6      # a quick check on a tiny random Llama
    python benchmarks/ddp.py --model DIR --batch 4 --processes 2 --fsdp --repeats 3

Every run is a real ``peftkit train`` process on the bundled training rows (no held-out evaluation, no
checkpoints), at the same global batch: one process at ``--batch-size N·b`` and ``--threads T``, then
``torchrun --nproc_per_node N`` at ``--batch-size b`` and ``--threads T/N`` each, so both use the same cores.
samples/s = steps × global batch / training seconds (report.json's ``train_seconds``: the loop only, not
loading or startup). The configurations alternate ``--repeats`` times; the median of each is printed with
the ratio N-process / 1-process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path


def run(model: str | None, data: str, out: Path, processes: int, batch: int, threads: int, args) -> float:
    """One ``peftkit train`` run; returns its samples/s."""
    flags = ["train", "--data", data, "--max-steps", str(args.steps), "--batch-size", str(batch)]
    flags += ["--save-every", "0", "--log-every", str(args.steps), "--skip-eval-before", "--warmup", "1"]
    flags += ["--threads", str(threads), "--no-progress", "--overwrite", "--output", str(out)]
    flags += ["--max-length", str(args.max_length)] + (["--model", model] if model else [])
    if processes > 1 and args.fsdp:
        flags.append("--fsdp")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "peftkit.cli", *flags]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--standalone", "-m", "peftkit.cli", "--", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == processes
    return report["steps"] * report["global_batch"] / report["train_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (a quick check that it runs)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="rows per process (1 process: batch x processes)")
    p.add_argument("--threads", type=int, default=2, help="threads of the 1-process run (split over N)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--fsdp", action="store_true", help="the N-process runs shard the base with FSDP2")
    args = p.parse_args()
    n = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        data = str(resources.files("peftkit").joinpath("data", "dates_train.jsonl"))
        if args.tiny:  # its toy tokenizer only knows the toy rows
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.train.tiny import build_tiny_model, rows, write_jsonl

            model = str(build_tiny_model(Path(tmp) / "tiny", chat_template=True))
            data = str(write_jsonl(Path(tmp) / "toy.jsonl", rows(64)))
        results: dict[int, list[float]] = {1: [], n: []}
        for r in range(args.repeats):
            results[1].append(run(model, data, Path(tmp) / "one", 1, args.batch * n, args.threads, args))
            per = max(1, args.threads // n)
            results[n].append(run(model, data, Path(tmp) / "many", n, args.batch, per, args))
            print(
                f"repeat {r + 1}: 1 process {results[1][-1]:.2f} samples/s, {n} processes {results[n][-1]:.2f}"
            )
    one, many = statistics.median(results[1]), statistics.median(results[n])
    mode = "FSDP2" if args.fsdp else "DDP"
    print(
        json.dumps(
            {
                "model": "tiny" if args.tiny else (args.model or "embedded SmolLM2-135M-Instruct"),
                "global_batch": args.batch * n,
                "steps": args.steps,
                "samples_per_s_1_process": round(one, 3),
                f"samples_per_s_{n}_processes_{mode}": round(many, 3),
                "speedup": round(many / one, 3),
                "load_average": os.getloadavg()[0],
                "cores": os.cpu_count(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
