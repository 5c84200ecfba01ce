"""`peftkit serve` under load: 32 concurrent clients vs one request at a time, same requests, same server.

    python benchmarks/serve.py [--model DIR] [--adapters 8] [--clients 32] [--new-tokens 64] [--quick]

Starts `peftkit serve` (a real subprocess on a free port) on the embedded SmolLM2-135M-Instruct (or --model)
with N random LoRA adapters (r=16, all linear layers) and sends the same greedy completion requests, spread
over the adapters, first one at a time, then from `--clients` threads at once, through the `openai` client.
Prints tokens/s and p50/p95 request latency for both and the throughput ratio; the answers must be identical.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def write_adapters(model_dir: str, folder: Path, count: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    import peftkit

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    names = [f"task{i}" for i in range(count)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        config = peftkit.LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights="gaussian"
        )
        model = peftkit.get_peft_model(base, config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.save_pretrained(folder / name)
        base = model.unload()
    return names


def start(model_dir: str, adapters: dict[str, Path], threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "peftkit.cli", "serve", "--model", model_dir, "--port", str(port)]
    cmd += ["--threads", str(threads)] + [a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def run(
    client, jobs: list[tuple[str, str]], tokens: int, concurrency: int
) -> tuple[float, list[float], list[str]]:
    """(wall seconds, per-request latencies, answers) for `jobs` sent by `concurrency` threads."""
    latencies, answers = [0.0] * len(jobs), [""] * len(jobs)
    cursor = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            start = time.perf_counter()
            out = client.completions.create(
                model=jobs[i][0],
                prompt=jobs[i][1],
                max_tokens=tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            latencies[i] = time.perf_counter() - start
            answers[i] = out.choices[0].text

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 adapters, 4 clients, 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.clients, args.new_tokens = 2, 4, 8
    from openai import OpenAI

    from peftkit.train.modeling import resolve_model

    model_dir = resolve_model(args.model, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_adapters(model_dir, Path(tmp), args.adapters)
        proc, url = start(model_dir, {n: Path(tmp) / n for n in names}, args.threads)
        try:
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
            topics = ["the sea", "a small town", "winter", "a robot", "bread", "the moon", "music", "trains"]
            jobs = [
                (names[i % len(names)], f"Write a short story about {topics[i % len(topics)]}.")
                for i in range(args.clients)
            ]
            one_wall, one_lat, one_ans = run(client, jobs, args.new_tokens, 1)
            many_wall, many_lat, many_ans = run(client, jobs, args.new_tokens, args.clients)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    tokens = args.clients * args.new_tokens

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]

    print(
        f"peftkit serve, {args.adapters} LoRA adapters (r=16 all-linear), {args.clients} requests x {args.new_tokens} tokens"
    )
    for label, wall, lat in (
        ("one at a time", one_wall, one_lat),
        (f"{args.clients} concurrent", many_wall, many_lat),
    ):
        print(
            f"  {label:>14}: {tokens / wall:7.1f} tokens/s   p50 {pct(lat, 50):6.2f} s   p95 {pct(lat, 95):6.2f} s"
        )
    print(
        f"  throughput ratio concurrent / one-at-a-time: {one_wall / many_wall:.2f}x   same answers: {one_ans == many_ans}"
    )


if __name__ == "__main__":
    main()
