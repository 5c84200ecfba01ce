"""First-run conversion of the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF -> fp32 HF folder):
transformers' GGUF path (the fallback, `default_model._convert_with_transformers`) against peftkit's own
reader + converter (`gguf_convert.convert_llama_gguf`), side by side.

    python benchmarks/convert.py [--rounds 3] [--threads 1]

Each conversion runs in a fresh child process (cold Python, warm OS page cache), alternating old/new for
`--rounds` rounds, with `--threads` torch/BLAS/OpenMP threads. Per child it reports the whole process wall
time (Python start, imports, conversion, exit) and the conversion alone (after importing torch, peftkit and
the transformers classes `peftkit train` loads the model with anyway: Auto*, Llama*, GenerationConfig,
PreTrainedTokenizerFast), and checks the new folder against the old one (file names, tensor names, shapes and
bits). Prints the medians and the old/new ratios. The machine's noise shows in the per-round lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(kind: str, out: str) -> dict:
    """Convert into the empty folder ``out`` with the ``kind`` ("old" or "new") path; seconds taken."""
    import torch

    # what `peftkit train` imports anyway to load the converted model: timed apart, not in convert_s
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from peftkit.train import default_model

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    gguf_path, folder = default_model.find_gguf(), Path(out)
    start = time.perf_counter()
    if kind == "old":
        default_model._convert_with_transformers(gguf_path, folder, progress=False)
    else:
        from peftkit.train.gguf_convert import convert_llama_gguf

        convert_llama_gguf(gguf_path, folder)
    return {"convert_s": time.perf_counter() - start}


def run(kind: str, threads: int, out: Path) -> dict:
    out.mkdir()
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{kind} conversion failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": wall}


def same_folder(old: Path, new: Path) -> bool:
    """The two folders hold the same file names and bit-identical tensors under the same names."""
    import torch
    from safetensors.torch import load_file

    if sorted(p.name for p in old.iterdir()) != sorted(p.name for p in new.iterdir()):
        return False
    a, b = load_file(old / "model.safetensors"), load_file(new / "model.safetensors")
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    results: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="peftkit-convert-bench-") as tmp:
        for index in range(args.rounds):
            for kind in ("old", "new"):
                results[kind].append(run(kind, args.threads, Path(tmp) / f"{kind}{index}"))
                print(
                    f"round {index + 1} {kind}: {json.dumps({k: round(v, 2) for k, v in results[kind][-1].items()})}"
                )
        identical = same_folder(Path(tmp) / "old0", Path(tmp) / "new0")
    print(f"\n{args.rounds} rounds, {args.threads} thread(s), medians; folders identical: {identical}")
    print(f"{'':24}{'old (transformers)':>20}{'new (peftkit)':>16}{'old/new':>10}")
    for key, label in (("convert_s", "conversion alone (s)"), ("process_s", "whole process (s)")):
        old = statistics.median(r[key] for r in results["old"])
        new = statistics.median(r[key] for r in results["new"])
        print(f"{label:24}{old:>20.2f}{new:>16.2f}{old / new:>9.1f}x")


if __name__ == "__main__":
    main()
