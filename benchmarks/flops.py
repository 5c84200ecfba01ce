"""The floor: FLOP counts of a LoRA training step and of a generate step for a decoder-only transformers
model, and this machine's fp32 GEMM peak (a plain `torch.mm`), so every benchmark row can print the fraction
of that floor it reaches (floor time = FLOPs / peak; fraction = floor time / measured time).

Counts are multiply-adds x 2 of the matmuls only (elementwise ops, norms, softmax are not counted: they are
what the rest of the time goes to). Shapes come from the model config (Llama-like: q, k, v, o, gate, up,
down; the LM head over the vocabulary).
"""

from __future__ import annotations

import time

import torch


def linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer (Llama-like)."""
    h, inter = config.hidden_size, config.intermediate_size
    heads, kv = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    d = getattr(config, "head_dim", None) or h // heads
    return [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, inter), (h, inter), (inter, h)]


def forward_flops(config, tokens: int, context: float, head_rows: int, lora_r: int = 0) -> float:
    """Matmul FLOPs of a forward over `tokens` new tokens attending to `context` keys on average, the LM
    head on `head_rows` rows, and (lora_r > 0) the unfolded LoRA branch on every linear layer."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    shapes = linear_shapes(config)
    dense = sum(i * o for i, o in shapes)
    lora = sum(lora_r * (i + o) for i, o in shapes)
    attn = 2 * heads * d * context  # q.k and p.v per token per layer (multiply-adds)
    per_token = layers * (dense + lora + attn)
    return 2.0 * (tokens * per_token + head_rows * config.hidden_size * config.vocab_size)


def train_step_flops(config, tokens: int, context: float, labelled: int, lora_r: int) -> float:
    """A LoRA training step: forward (head at the labelled rows only), input-gradient backward through the
    frozen layers (the same matmuls again), and the adapter weight gradients (2 rank-r GEMMs per layer)."""
    fwd = forward_flops(config, tokens, context, labelled, lora_r)
    shapes = linear_shapes(config)
    adapter_grads = 2.0 * tokens * config.num_hidden_layers * sum(lora_r * (i + o) for i, o in shapes)
    return 2 * fwd + adapter_grads


def generate_flops(config, rows: int, prompt: int, new: int, lora_r: int = 0) -> float:
    """Greedy generation of `new` tokens for `rows` prompts of `prompt` tokens with a KV cache: the prefill
    (head on the last position only) and new - 1 decode steps (head on every row)."""
    prefill = forward_flops(config, rows * prompt, prompt / 2, rows, lora_r)
    decode = sum(forward_flops(config, rows, prompt + t, rows, lora_r) for t in range(1, new))
    return prefill + decode


def gemm_peak(threads: int, n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best fp32 `torch.mm` rate of an n x n x n product with `threads` threads: (FLOP per wall second,
    FLOP per CPU second of this process). On an idle machine cpu ~= wall / threads; under contention from
    other processes the CPU-second rate is the steadier one (it excludes time the process was not running)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = [_timed(lambda: torch.mm(a, b)) for _ in range(repeats)]
    finally:
        torch.set_num_threads(saved)
    flops = 2.0 * n**3
    cpu = sorted(c for _, c in times)[len(times) // 2]  # median: a single CPU-time reading can be short
    return flops / min(w for w, _ in times), flops / cpu


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def fraction(flops: float, seconds: float, peak: float) -> float:
    """Fraction of the GEMM floor reached: (flops / peak) / seconds (wall with a wall peak, CPU seconds with
    a CPU-second peak)."""
    return flops / peak / seconds
