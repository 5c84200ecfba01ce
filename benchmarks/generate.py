"""Generation benchmark: HF peft's `generate` vs peftkit's, one active LoRA adapter, same prompts, same model.

    python benchmarks/generate.py [--threads 2] [--rounds 2] [--new-tokens 64] [--eval-limit 200]
                                  [--rows b1,b32,eval,evalcmd] [--model DIR] [--adapter DIR]

Model: the embedded SmolLM2-135M-Instruct (fp32). Adapter: LoRA r=16 alpha 32 on every linear layer with
seeded random non-zero B (saved by HF peft, loaded by peftkit from the same files), or `--adapter DIR`.
Prompts: the bundled held-out date questions in the chat template. Rows:
- b1: `model.generate` one prompt at a time (4 prompts), greedy, exactly --new-tokens new tokens (peftkit's
  default at batch 1 checks prompt-lookup candidates, `prompt_lookup.py`; HF peft's does not);
- b1lookup: the same with HF peft's `generate` given `prompt_lookup_num_tokens=4` (what it gets when asked);
- b32: `model.generate` on 32 prompts left-padded, greedy, exactly --new-tokens new tokens;
- eval: the held-out set (--eval-limit prompts) generated as `train.evaluate.exact_match` does it (batches of
  32 sorted by length, shared prefix, stop at end of turn) vs HF peft's `generate` on the same batches with
  plain left padding; the decoded answers are compared;
- evalcmd: what `peftkit eval` computes on those rows, the response-token loss and greedy exact match: HF peft's
  plain loss forward and batched `generate` of every row vs `train.held_out` (one teacher-forced pass per
  prompt, decode steps only for the rows it leaves open); the hit counts and losses (to 1e-4) are compared. Tokens/s
  counts the response tokens scored.
Rounds are interleaved (HF, peftkit, HF, peftkit...) in one process; the best round counts. Wall time
(perf_counter) and this process's CPU time are both printed: under CPU contention the CPU-time ratio is the
steadier one. Each row also prints the fraction of the fp32 GEMM floor (benchmarks/flops.py) it reaches.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import forward_flops, fraction, gemm_peak, generate_flops  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "peftkit" / "data"


def build(a):
    import peft

    import peftkit
    from peftkit.train.modeling import load_model_and_tokenizer

    base, tok, _ = load_model_and_tokenizer(a.model, progress=False)
    base.eval()
    if a.adapter:  # a trained adapter (e.g. the default run's), loaded by both libraries from its files
        hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), a.adapter).eval()
        return hf, peftkit.PeftModel.from_pretrained(base, a.adapter).eval(), tok
    torch.manual_seed(a.seed)
    cfg = dict(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules="all-linear")
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg, init_lora_weights=False)).eval()
    with torch.no_grad():  # kaiming B is too large for readable text; keep the update moderate
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    tmp = tempfile.mkdtemp(prefix="peftkit-gen-bench-")
    hf.save_pretrained(tmp)
    pk = peftkit.PeftModel.from_pretrained(base, tmp).eval()
    return hf, pk, tok


def prompts(tok, limit: int) -> list[list[int]]:
    from peftkit.train.data import encode_prompt, load_examples

    rows = load_examples([str(BUNDLED / "dates_eval.jsonl")])[: limit or None]
    return [encode_prompt(tok, e) for e in rows], rows


def left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    return ids, mask


def fixed_generate(model, batch, tok, new: int, **extra) -> torch.Tensor:
    ids, mask = left_pad(batch, tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            **extra,
        )
    return out[:, ids.shape[1] :]


def hf_eval_texts(model, tok, all_prompts, new: int) -> list[str]:
    """HF peft's plain batched greedy generation of the held-out prompts (same batches as train.evaluate)."""
    order = sorted(range(len(all_prompts)), key=lambda i: len(all_prompts[i]))
    texts: dict[int, str] = {}
    for s in range(0, len(order), 32):
        chunk = order[s : s + 32]
        ids, mask = left_pad([all_prompts[i] for i in chunk], tok.pad_token_id)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        for i, t in zip(chunk, tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)):
            texts[i] = t.strip()
    return [texts[i] for i in range(len(all_prompts))]


def pk_eval_texts(model, tok, rows, new: int) -> list[str]:
    from peftkit.train.evaluate import encode_prompt, generate_batch

    all_prompts = [encode_prompt(tok, e) for e in rows]
    order = sorted(range(len(all_prompts)), key=lambda i: len(all_prompts[i]))
    texts: dict[int, str] = {}
    for s in range(0, len(order), 32):
        chunk = order[s : s + 32]
        for i, t in zip(chunk, generate_batch(model, tok, [all_prompts[i] for i in chunk], new)):
            texts[i] = t.strip()
    return [texts[i] for i in range(len(all_prompts))]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapter", default=None, help="a trained LoRA adapter folder instead of the random one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="b1,b1lookup,b32,eval,evalcmd")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    wanted = set(a.rows.split(","))
    from peftkit.train.evaluate import default_max_new_tokens

    hf, pk, tok = build(a)
    config = pk.get_base_model().config
    peak = gemm_peak(a.threads)
    print(
        f"fp32 GEMM peak ({a.threads} threads): {peak[0] / 1e9:.1f} GFLOP per wall s, "
        f"{peak[1] / 1e9:.1f} GFLOP per CPU s; floor fraction = matmul FLOPs / peak / time (CPU basis)"
    )
    ps, rows = prompts(tok, max(a.eval_limit, 32))
    new = a.new_tokens
    cases = {}
    if "b1" in wanted:
        cases["b1"] = (
            lambda m: [fixed_generate(m, [p], tok, new) for p in ps[:4]],
            4 * new,
            sum(generate_flops(config, 1, len(p), new, 0) for p in ps[:4]),
        )
    if "b1lookup" in wanted:  # what HF peft gets when its user asks for what peftkit does by default
        cases["b1, HF with prompt_lookup_num_tokens=4"] = (
            lambda m: [
                fixed_generate(m, [p], tok, new, **({"prompt_lookup_num_tokens": 4} if m is hf else {}))
                for p in ps[:4]
            ],
            4 * new,
            sum(generate_flops(config, 1, len(p), new, 0) for p in ps[:4]),
        )
    if "b32" in wanted:
        width = max(len(p) for p in ps[:32])
        cases["b32"] = (
            lambda m: fixed_generate(m, ps[:32], tok, new),
            32 * new,
            generate_flops(config, 32, width, new, 0),
        )
    print(
        "| row | HF peft s (cpu s) | peftkit s (cpu s) | speed-up wall (cpu) | HF tok/s | peftkit tok/s | "
        "floor fraction HF / peftkit | identical |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, (fn, tokens, flops) in cases.items():
        fn(hf), fn(pk)  # warm-up
        best = {"hf": (1e9, 1e9), "pk": (1e9, 1e9)}
        outs = {}
        for _ in range(a.rounds):
            for side, m in (("hf", hf), ("pk", pk)):
                w, c, outs[side] = timed(lambda m=m, fn=fn: fn(m))
                best[side] = (min(best[side][0], w), min(best[side][1], c))
        same = all(torch.equal(x, y) for x, y in zip(_list(outs["hf"]), _list(outs["pk"])))
        _row(name, best, tokens, flops, peak, "yes" if same else "NO")
    if "eval" in wanted:
        ev_rows = rows[: a.eval_limit]
        ev_prompts = ps[: a.eval_limit]
        max_new = default_max_new_tokens(tok, ev_rows)
        best = {"hf": (1e9, 1e9), "pk": (1e9, 1e9)}
        outs = {}
        for _ in range(a.rounds):
            w, c, outs["hf"] = timed(lambda: hf_eval_texts(hf, tok, ev_prompts, max_new))
            best["hf"] = (min(best["hf"][0], w), min(best["hf"][1], c))
            w, c, outs["pk"] = timed(lambda: pk_eval_texts(pk, tok, ev_rows, max_new))
            best["pk"] = (min(best["pk"][0], w), min(best["pk"][1], c))
        tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in outs["hf"])
        mean = sum(len(p) for p in ev_prompts) / len(ev_prompts)
        flops = generate_flops(config, len(ev_prompts), int(mean), max_new, 0)
        same = outs["hf"] == outs["pk"]
        diff = sum(x != y for x, y in zip(outs["hf"], outs["pk"]))
        _row(
            f"eval ({len(ev_prompts)} prompts)", best, tokens, flops, peak, "yes" if same else f"NO ({diff})"
        )
    if "evalcmd" in wanted:
        eval_command_rows(a, hf, pk, tok, rows, config, peak)


def eval_command_rows(a, hf, pk, tok, rows, config, peak) -> None:
    """`peftkit eval`'s work on the held-out rows: the response-token loss and greedy exact match. HF peft: the
    plain loss forward (labels on the response) and batched `generate` of every row, as its user would run
    them; peftkit: `train.held_out` (what `peftkit eval` calls), one teacher-forced pass that settles most rows
    and generates the rest. Same numbers: equal hit count, loss equal to 1e-4 (relative)."""
    from peftkit.train.data import collate, encode_prompt, tokenize_all
    from peftkit.train.evaluate import _shared_prompt_length, count_targets, default_max_new_tokens
    from peftkit.train.held_out import held_out

    ev_rows = rows[: a.eval_limit]
    max_new = default_max_new_tokens(tok, ev_rows)
    items = tokenize_all(tok, ev_rows, 256, "held-out")
    ev_prompts = [encode_prompt(tok, e) for e in ev_rows]
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))

    def hf_side():
        total = count = 0
        with torch.no_grad():  # the plain forward with labels on the responses, batches sorted by length
            for s in range(0, len(order), 32):
                batch = collate([items[i] for i in order[s : s + 32]], tok.pad_token_id)
                total += float(hf(**batch, num_items_in_batch=1).loss)  # 1: the summed loss
                count += count_targets(batch["labels"])
        texts = hf_eval_texts(hf, tok, ev_prompts, max_new)
        return total / count, sum(t == e.response.strip() for t, e in zip(texts, ev_rows))

    def pk_side():
        loss, em = held_out(pk, tok, ev_rows, 256, max_new, 32, n_samples=0)
        return loss["loss"], em["correct"]

    best = {"hf": (1e9, 1e9), "pk": (1e9, 1e9)}
    outs = {}
    for _ in range(a.rounds):
        for side, fn in (("hf", hf_side), ("pk", pk_side)):
            w, c, outs[side] = timed(fn)
            best[side] = (min(best[side][0], w), min(best[side][1], c))
    tokens = sum(len(t.input_ids) - t.prompt_len for t in items)  # response tokens scored
    # the floor: one teacher-forced forward over every row, the head at its response positions (the loss
    # needs that much; greedy answers that equal the reference come from the same logits)
    shared = _shared_prompt_length(pk, ev_prompts)  # the opening every prompt shares: needed once
    length = shared + sum(len(t.input_ids) - shared for t in items)
    flops = forward_flops(config, length, sum(len(t.input_ids) for t in items) / len(items) / 2, tokens, 0)
    (hl, hc), (pl, pc) = outs["hf"], outs["pk"]
    rel = abs(hl - pl) / abs(hl)
    same = hc == pc and rel <= 1e-4  # fp32 summation order: ~1e-6 of the loss
    verdict = (
        f"{'yes' if same else 'NO'} (hits {hc} / {pc} of {len(ev_rows)}, loss {hl:.6g} / {pl:.6g}: {rel:.1e})"
    )
    _row(f"`peftkit eval` work ({len(ev_rows)} rows: loss + exact match)", best, tokens, flops, peak, verdict)


def _list(x):
    return x if isinstance(x, list) else [x]


def _row(name, best, tokens, flops, peak, same) -> None:
    (hw, hc), (pw, pc) = best["hf"], best["pk"]
    print(
        f"| {name} | {hw:.2f} ({hc:.2f}) | {pw:.2f} ({pc:.2f}) | {hw / pw:.2f}x ({hc / pc:.2f}x) | "
        f"{tokens / hw:.1f} | {tokens / pw:.1f} | {fraction(flops, hc, peak[1]):.2f} / {fraction(flops, pc, peak[1]):.2f} "
        f"| {same} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
