"""End-to-end benchmark: the brief's pipeline (transformers Trainer + DataCollatorForLanguageModeling + HF
peft LoRA), TRL's SFTTrainer + HF peft with completion-only loss (what a user who wants results picks), and
`peftkit train`: same model, same bundled data, same epochs, batch, LoRA settings, lr schedule and threads.

    python benchmarks/end_to_end.py [--epochs 1] [--batch-size 8] [--r 8] [--alpha 16] [--lr 2e-3]
                                    [--model DIR] [--eval-limit 200] [--only hf|sft|peftkit]

SFTTrainer gets the very token sequences `peftkit train` trains on (pre-tokenized `input_ids` plus a
`completion_mask` that is 1 on the response, so its labels are peftkit's), fp32 (`bf16=False`) and
`gradient_checkpointing=False` (TRL's defaults are bf16 and checkpointing; both would change the comparison:
peftkit trains fp32 without checkpointing).

Each side runs in its own child process, one after the other (peak RSS is the child's own ru_maxrss).
The held-out metric is computed by the same code for both (peftkit.train.evaluate): response-only loss
and exact match of greedy answers on the bundled held-out set. Both sides train on identical token
sequences (prompt + response, chat template, truncated to --max-length); the brief's collator labels every
token (pads and, as it does, eos tokens are -100), `peftkit train` labels the response only.
Training time excludes model loading and evaluation on both sides; wall time is the whole child process.
The last row is the fraction of the fp32 GEMM floor each side's training time reaches (`floor_seconds`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "peftkit" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def hf_child(a: argparse.Namespace) -> dict:
    """Train with transformers.Trainer + HF peft as in the brief; return timings and held-out metrics."""
    t0 = time.time()
    import peft
    import torch
    import transformers

    from peftkit.train.data import load_examples, tokenize_all
    from peftkit.train.evaluate import default_max_new_tokens, eval_loss, exact_match
    from peftkit.train.modeling import load_model_and_tokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    base, tok, _ = load_model_and_tokenizer(a.model, progress=False)
    train_items = tokenize_all(
        tok, load_examples([str(BUNDLED / "dates_train.jsonl")]), a.max_length, "train"
    )
    eval_rows = load_examples([str(BUNDLED / "dates_eval.jsonl")])[: a.eval_limit or None]
    eval_items = tokenize_all(tok, eval_rows, a.max_length, "held-out")
    dataset = [{"input_ids": t.input_ids} for t in train_items]
    targets = "all-linear" if a.targets == ["all-linear"] else a.targets
    config = peft.LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(base, config)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            num_train_epochs=a.epochs,
            per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=a.grad_accum,
            learning_rate=a.lr,
            lr_scheduler_type="cosine",
            warmup_steps=a.warmup,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            seed=a.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        t = time.time()
        result = trainer.train()
        train_s = time.time() - t
    loss = eval_loss(model, eval_items, tok.pad_token_id)
    em = exact_match(model, tok, eval_rows, default_max_new_tokens(tok, eval_rows))
    tokens = sum(len(t.input_ids) for t in train_items) * a.epochs
    return {
        "train_seconds": train_s,
        "wall_seconds": time.time() - t0,
        "tokens": tokens,
        "tokens_per_second": tokens / train_s,
        "steps": result.global_step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_loss": loss["loss"],
        "exact_match": em["exact_match"],
    }


def sft_child(a: argparse.Namespace) -> dict:
    """Train with TRL's SFTTrainer + HF peft, completion-only loss; return timings and held-out metrics."""
    t0 = time.time()
    import datasets
    import peft
    import torch
    import trl

    from peftkit.train.data import load_examples, tokenize_all
    from peftkit.train.evaluate import default_max_new_tokens, eval_loss, exact_match
    from peftkit.train.modeling import load_model_and_tokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    base, tok, _ = load_model_and_tokenizer(a.model, progress=False)
    train_items = tokenize_all(
        tok, load_examples([str(BUNDLED / "dates_train.jsonl")]), a.max_length, "train"
    )
    eval_rows = load_examples([str(BUNDLED / "dates_eval.jsonl")])[: a.eval_limit or None]
    eval_items = tokenize_all(tok, eval_rows, a.max_length, "held-out")
    dataset = datasets.Dataset.from_list(
        [
            {
                "input_ids": t.input_ids,
                "completion_mask": [0] * t.prompt_len + [1] * (len(t.input_ids) - t.prompt_len),
            }
            for t in train_items
        ]
    )
    targets = "all-linear" if a.targets == ["all-linear"] else a.targets
    config = peft.LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(
            output_dir=out,
            num_train_epochs=a.epochs,
            per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=a.grad_accum,
            learning_rate=a.lr,
            lr_scheduler_type="cosine",
            warmup_steps=a.warmup,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            seed=a.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            completion_only_loss=True,
            max_length=a.max_length,
            packing=False,
            bf16=False,
            gradient_checkpointing=False,
        )
        trainer = trl.SFTTrainer(
            model=base, args=args, train_dataset=dataset, processing_class=tok, peft_config=config
        )
        t = time.time()
        result = trainer.train()
        train_s = time.time() - t
        model = trainer.model
    loss = eval_loss(model, eval_items, tok.pad_token_id)
    em = exact_match(model, tok, eval_rows, default_max_new_tokens(tok, eval_rows))
    tokens = sum(len(t.input_ids) for t in train_items) * a.epochs
    return {
        "train_seconds": train_s,
        "wall_seconds": time.time() - t0,
        "tokens": tokens,
        "tokens_per_second": tokens / train_s,
        "steps": result.global_step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_loss": loss["loss"],
        "exact_match": em["exact_match"],
    }


def peftkit_run(a: argparse.Namespace) -> dict:
    """Run `peftkit train` (the CLI) in a child process; read its report.json."""
    out = Path(tempfile.mkdtemp(prefix="peftkit-e2e-"))
    cmd = [
        sys.executable,
        "-m",
        "peftkit.cli",
        "train",
        "--output",
        str(out),
        "--overwrite",
        "--no-progress",
        "--skip-eval-before",  # the HF side evaluates the trained model only, so do we
        "--epochs",
        str(a.epochs),
        "--max-steps",
        "0",
        "--batch-size",
        str(a.batch_size),
        "--grad-accum",
        str(a.grad_accum),
        "--r",
        str(a.r),
        "--alpha",
        str(a.alpha),
        "--dropout",
        str(a.dropout),
        "--lr",
        str(a.lr),
        "--scheduler",
        "cosine",
        "--warmup",
        str(a.warmup),
        "--seed",
        str(a.seed),
        "--max-length",
        str(a.max_length),
        "--eval-limit",
        str(a.eval_limit),
        "--threads",
        str(a.threads),
        "--save-every",
        "0",
        "--targets",
        *a.targets,
    ]
    if a.model:
        cmd += ["--model", a.model]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(
            f"peftkit train failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    r = json.loads((out / "report.json").read_text())
    ev = r.get("eval") or {}
    return {
        "train_seconds": r["train_seconds"],
        "wall_seconds": wall,
        "tokens": r["tokens"],
        "tokens_per_second": r["tokens_per_second"],
        "steps": r["steps"],
        "peak_rss_mb": r["peak_rss_mb"],
        "eval_loss": (ev.get("after") or {}).get("loss"),
        "exact_match": (ev.get("exact_match_after") or {}).get("exact_match"),
    }


def floor_seconds(a: argparse.Namespace) -> float:
    """Seconds this machine's fp32 GEMM peak needs for the matmuls of the training (benchmarks/flops.py): every
    epoch's rows (their real tokens), the head at the response tokens only, LoRA r on every linear layer, and
    the opening all rows share (chat template + instruction) once per batch of --batch-size rows, the least
    work this training needs. The same floor for all three sides; a side that recomputes the shared opening
    per row (or the head on every position) does more matmul work than the floor counts."""
    import os

    import torch
    from flops import gemm_peak, train_step_flops
    from transformers import AutoConfig, AutoTokenizer

    from peftkit.train.data import load_examples, tokenize_all
    from peftkit.train.modeling import resolve_model

    name = resolve_model(a.model, progress=False)  # the config and tokenizer only: no weights needed here
    tok = AutoTokenizer.from_pretrained(name)
    items = tokenize_all(tok, load_examples([str(BUNDLED / "dates_train.jsonl")]), a.max_length, "train")
    shared = len(os.path.commonprefix([t.input_ids[: t.prompt_len] for t in items]))
    cfg, batches = AutoConfig.from_pretrained(name), -(-len(items) // a.batch_size)
    flops = batches * train_step_flops(cfg, shared, shared / 2, 0, a.r)
    for t in items:
        own = len(t.input_ids) - shared
        flops += train_step_flops(cfg, own, shared + own / 2, len(t.input_ids) - t.prompt_len, a.r)
    peak, _ = gemm_peak(a.threads)
    print(
        f"fp32 GEMM peak ({a.threads} threads): {peak / 1e9:.1f} GFLOP/s; training floor "
        f"{flops * a.epochs / 1e12:.2f} TFLOP ({shared} shared opening tokens once per batch)"
    )
    torch.set_num_threads(a.threads)
    return flops * a.epochs / peak


def print_table(hf: dict | None, sft: dict | None, pk: dict | None, floor: float | None = None) -> None:
    for side in (hf, sft, pk):
        if side and floor:
            side["floor_fraction"] = floor / side["train_seconds"]
    rows = [
        ("training seconds", "train_seconds", "{:.1f}"),
        ("process wall seconds", "wall_seconds", "{:.1f}"),
        ("optimizer steps", "steps", "{}"),
        ("real tokens trained", "tokens", "{:,}"),
        ("tokens / s", "tokens_per_second", "{:.1f}"),
        ("peak RSS MiB", "peak_rss_mb", "{:,.0f}"),
        ("held-out loss (response)", "eval_loss", "{:.4f}"),
        ("held-out exact match", "exact_match", "{:.3f}"),
        ("fraction of the GEMM floor (training)", "floor_fraction", "{:.3f}"),
    ]

    def ratio(p, h):
        ok = isinstance(h, (int, float)) and isinstance(p, (int, float)) and h
        return f"{p / h:.2f}" if ok else "-"

    print(
        "| metric | Trainer + HF peft | SFTTrainer + HF peft | peftkit train | peftkit / Trainer | peftkit / SFT |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, key, f in rows:
        h, s, p = ((d or {}).get(key) for d in (hf, sft, pk))
        cells = ["-" if v is None else f.format(v) for v in (h, s, p)]
        print(f"| {label} | {' | '.join(cells)} | {ratio(p, h)} | {ratio(p, s)} |")


def _child(flag: str) -> dict:
    argv = [x for x in sys.argv[1:] if x not in ("--hf-child", "--sft-child")]
    proc = subprocess.run([sys.executable, __file__, *argv, flag], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{flag} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="HF folder (default: peftkit's embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", nargs="+", default=["all-linear"])
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["hf", "sft", "peftkit"], default=None)
    ap.add_argument("--json", default=None, help="also write both results to this file")
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sft-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_child:
        print(json.dumps(hf_child(a)))
        return
    if a.sft_child:
        print(json.dumps(sft_child(a)))
        return
    hf = sft = pk = None
    if a.only in (None, "hf"):
        hf = _child("--hf-child")
    if a.only in (None, "sft"):
        sft = _child("--sft-child")
    if a.only in (None, "peftkit"):
        pk = peftkit_run(a)
    print_table(hf, sft, pk, floor_seconds(a))
    if a.json:
        Path(a.json).write_text(json.dumps({"hf": hf, "sft": sft, "peftkit": pk}, indent=1))


if __name__ == "__main__":
    main()
