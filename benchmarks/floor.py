"""The floor: this machine's fp32 GEMM peak, the matmul FLOPs of a LoRA training step and of greedy
generation on SmolLM2-135M (benchmarks/flops.py), the fraction of that floor peftkit reaches, and where the
rest of the time goes (profile table: matmul / attention / elementwise / Python overhead).

    python benchmarks/floor.py [--threads 2] [--batch 8] [--seq 128] [--gen-rows 32] [--new-tokens 64]
                               [--no-default-step]

Model: SmolLM2-135M architecture, fp32, seeded random weights (no download), LoRA r=16 on every linear layer
(peftkit), labels on the second half of each row. A third row is the step `peftkit train` runs with no
arguments: the embedded SmolLM2-135M-Instruct, LoRA r=8 alpha 16 on every linear layer, a batch of 8 bundled
rows (their 66-token shared opening run once, packed with the rows' own tokens), labels on the responses.
Profile buckets (torch.profiler self CPU time of aten ops): matmul = mm/addmm/linear/matmul; attention =
scaled_dot_product_* kernels, and bmm/baddbmm and softmax (in these models only attention uses them: the
packed attention's grouped products); elementwise = every other aten op; Python overhead = wall time of the
profiled call minus all aten self time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import fraction, gemm_peak, generate_flops, train_step_flops  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::addmm_")
ATTENTION = ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data")


def smollm2(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    return LlamaForCausalLM(cfg)


def profile(fn) -> dict[str, float]:
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    buckets = {"matmul": 0.0, "attention": 0.0, "elementwise": 0.0}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        s = e.self_cpu_time_total / 1e6
        if e.key in MATMUL:
            buckets["matmul"] += s
        elif "scaled_dot_product" in e.key or "attention" in e.key or e.key in ATTENTION:
            buckets["attention"] += s
        else:
            buckets["elementwise"] += s
    buckets["python overhead"] = max(0.0, wall - sum(buckets.values()))
    buckets["wall"] = wall
    return buckets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--gen-rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument(
        "--no-default-step", action="store_true", help="skip the `peftkit train` default step row"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import peftkit

    wall_peak, cpu_peak = gemm_peak(a.threads)
    print(
        f"fp32 GEMM peak, {a.threads} threads: {wall_peak / 1e9:.1f} GFLOP/s wall ({cpu_peak / 1e9:.1f} per CPU s)"
    )
    model = peftkit.get_peft_model(
        smollm2(), peftkit.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules="all-linear")
    )
    config = model.get_base_model().config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), generator=g)
    labels = ids.clone()
    labels[:, : a.seq // 2] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    prompts = torch.randint(0, config.vocab_size, (a.gen_rows, a.prompt), generator=g)

    def gen():
        model.eval()
        with torch.no_grad():
            model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=a.new_tokens,
                min_new_tokens=a.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    cases = []
    if not a.no_default_step:
        cases.append(default_step())
    rows = []
    for name, fn, flops in (
        *cases,
        (
            f"LoRA train step {a.batch}x{a.seq}",
            step,
            train_step_flops(config, a.batch * a.seq, a.seq / 2, a.batch * (a.seq // 2), a.r),
        ),
        (
            f"generate {a.gen_rows}x{a.prompt} + {a.new_tokens}",
            gen,
            generate_flops(config, a.gen_rows, a.prompt, a.new_tokens, 0),
        ),
    ):
        fn()  # warm-up
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rows.append((name, flops, wall, cpu, profile(fn)))
    print("\n| path | matmul GFLOP | wall s | floor s | fraction of floor (wall / CPU basis) |")
    print("|---|---:|---:|---:|---:|")
    for name, flops, wall, cpu, _ in rows:
        print(
            f"| {name} | {flops / 1e9:.1f} | {wall:.2f} | {flops / wall_peak:.2f} | "
            f"{fraction(flops, wall, wall_peak):.2f} / {fraction(flops, cpu, cpu_peak):.2f} |"
        )
    print("\nProfile (share of the profiled wall time):\n")
    print("| path | matmul | attention | elementwise | Python overhead |")
    print("|---|---:|---:|---:|---:|")
    for name, *_, b in rows:
        w = b["wall"]
        print(
            f"| {name} | {b['matmul'] / w:.0%} | {b['attention'] / w:.0%} | {b['elementwise'] / w:.0%} | "
            f"{b['python overhead'] / w:.0%} |"
        )


def default_step():
    """(name, step function, matmul FLOPs) of the training step `peftkit train` runs with no arguments."""
    from peftkit.shared_prefix import common_prefix_length
    from peftkit.train import loop
    from peftkit.train.data import collate, tokenize_all
    from peftkit.train.options import TrainOptions

    o = TrainOptions()
    torch.manual_seed(o.seed)
    train_rows, _ = loop.load_data(o)
    base, tokenizer, _ = loop.load_model_and_tokenizer(o.model, False, o.quantize)
    items = tokenize_all(tokenizer, train_rows, o.max_length, "training")
    model = loop.wrap_model(base, o, None, 50)
    batch = collate(
        [items[i] for i in next(loop.micro_batches([len(t.input_ids) for t in items], o.batch_size, o.seed))],
        tokenizer.pad_token_id,
    )
    prefix = common_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"])  # as training
    own = batch["attention_mask"][:, prefix:].sum(1).float()  # each row's tokens after the shared opening
    tokens = prefix + int(own.sum())
    context = (prefix * prefix / 2 + float((own * (prefix + own / 2)).sum())) / tokens  # keys per query
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr)

    def step():
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = train_step_flops(model.get_base_model().config, tokens, context, labelled, o.r)
    rows = batch["input_ids"].shape[0]
    return f"`peftkit train` default step ({rows} rows, {tokens} tokens packed)", step, flops


if __name__ == "__main__":
    main()
