"""End-to-end benchmark: the brief's pipeline (transformers Trainer + DataCollatorForLanguageModeling + HF
peft LoRA) vs `peftkit train`, same model, same bundled data, same epochs, batch and LoRA settings.

    python benchmarks/end_to_end.py [--epochs 1] [--batch-size 8] [--r 8] [--alpha 16] [--lr 2e-3]
                                    [--model DIR] [--eval-limit 200] [--only hf|peftkit]

Each side runs in its own child process, one after the other (peak RSS is the child's own ru_maxrss).
The held-out metric is computed by the same code for both (peftkit.train.evaluate): response-only loss
and exact match of greedy answers on the bundled held-out set. Both sides train on identical token
sequences (prompt + response, chat template, truncated to --max-length); the brief's collator labels every
token (pads and, as it does, eos tokens are -100), `peftkit train` labels the response only.
Training time excludes model loading and evaluation on both sides; wall time is the whole child process.
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


def print_table(hf: dict | None, pk: dict | None) -> None:
    rows = [
        ("training seconds", "train_seconds", "{:.1f}"),
        ("process wall seconds", "wall_seconds", "{:.1f}"),
        ("optimizer steps", "steps", "{}"),
        ("real tokens trained", "tokens", "{:,}"),
        ("tokens / s", "tokens_per_second", "{:.1f}"),
        ("peak RSS MiB", "peak_rss_mb", "{:,.0f}"),
        ("held-out loss (response)", "eval_loss", "{:.4f}"),
        ("held-out exact match", "exact_match", "{:.3f}"),
    ]
    print("| metric | Trainer + HF peft | peftkit train | peftkit / HF |")
    print("|---|---:|---:|---:|")
    for label, key, f in rows:
        h, p = (hf or {}).get(key), (pk or {}).get(key)
        ratio = f"{p / h:.2f}" if isinstance(h, (int, float)) and isinstance(p, (int, float)) and h else "-"
        print(
            f"| {label} | {'-' if h is None else f.format(h)} | {'-' if p is None else f.format(p)} | {ratio} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="HF folder (default: peftkit's embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--epochs", type=int, default=1)
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
    ap.add_argument("--only", choices=["hf", "peftkit"], default=None)
    ap.add_argument("--json", default=None, help="also write both results to this file")
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_child:
        print(json.dumps(hf_child(a)))
        return
    hf = pk = None
    if a.only != "peftkit":
        argv = [x for x in sys.argv[1:] if x != "--hf-child"]
        proc = subprocess.run([sys.executable, __file__, *argv, "--hf-child"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"HF child failed:\n{proc.stderr[-3000:]}")
        hf = json.loads(proc.stdout.strip().splitlines()[-1])
    if a.only != "hf":
        pk = peftkit_run(a)
    print_table(hf, pk)
    if a.json:
        Path(a.json).write_text(json.dumps({"hf": hf, "peftkit": pk}, indent=1))


if __name__ == "__main__":
    main()
