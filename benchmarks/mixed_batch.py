"""Mixed-adapter generation: HF peft vs peftkit, side by side, on SmolLM2-135M (fp32, seeded random weights).

    python benchmarks/mixed_batch.py [--adapters 8] [--prompts 32] [--new-tokens 64] [--rounds 3] [--quick]

8 LoRA adapters (r=16, all linear layers, random non-zero B) on one base; 32 prompts of 24-40 tokens, left
padded, each assigned an adapter round-robin; greedy `generate(..., adapter_names=...)` for 64 new tokens.
Both libraries load the same adapter files onto the same base weights; rounds alternate HF, peftkit, HF, ...
so load from other processes hits both alike. Prints tokens/s per side, the ratio, and whether the generated
tokens are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import SMOLLM2_135M, base_model  # noqa: E402


def write_adapters(folder: Path, count: int, rank: int) -> list[str]:
    """Save `count` random LoRA adapters (peftkit writes HF peft's format) under folder/<name>."""
    import peftkit

    names = [f"task{i}" for i in range(count)]
    model = None
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        config = peftkit.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False
        )
        if model is None:
            model = peftkit.get_peft_model(base_model(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.save_pretrained(folder)
    return names


def load(lib: str, folder: Path, names: list[str]) -> torch.nn.Module:
    mod = __import__("peft" if lib == "hf" else "peftkit")
    model = mod.PeftModel.from_pretrained(base_model().eval(), folder / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    return model.eval()


def prompts(count: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(24, 41, (count,), generator=g).tolist()
    width = max(lengths)
    ids = torch.zeros(count, width, dtype=torch.long)
    mask = torch.zeros(count, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, SMOLLM2_135M["vocab_size"], (n,), generator=g)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 adapters, 8 prompts, 8 tokens, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.prompts, args.new_tokens, args.rounds = 2, 8, 8, 1
    torch.set_num_threads(args.threads)
    batch = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_adapters(Path(tmp), args.adapters, args.rank)
        models = {lib: load(lib, Path(tmp), names) for lib in ("hf", "peftkit")}
    rows = [names[i % len(names)] for i in range(args.prompts)]
    kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    times: dict[str, list[float]] = {"hf": [], "peftkit": []}
    outputs = {}
    for _ in range(args.rounds):
        for lib, model in models.items():
            start = time.perf_counter()
            with torch.inference_mode():
                outputs[lib] = model.generate(**batch, adapter_names=rows, pad_token_id=0, **kw)
            times[lib].append(time.perf_counter() - start)
    tokens = args.prompts * args.new_tokens
    rate = {lib: tokens / statistics.median(t) for lib, t in times.items()}
    same = torch.equal(outputs["hf"], outputs["peftkit"])
    print(
        f"{args.adapters} adapters r={args.rank} all-linear, {args.prompts} prompts x {args.new_tokens} new tokens, "
        f"{args.threads} threads, median of {args.rounds}"
    )
    print(f"  HF peft   {rate['hf']:8.1f} tokens/s   ({statistics.median(times['hf']):.2f} s)")
    print(f"  peftkit   {rate['peftkit']:8.1f} tokens/s   ({statistics.median(times['peftkit']):.2f} s)")
    print(f"  ratio peftkit/HF throughput: {rate['peftkit'] / rate['hf']:.2f}x   identical tokens: {same}")


if __name__ == "__main__":
    main()
