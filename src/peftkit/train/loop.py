"""The training loop of ``peftkit train``: read it top to bottom.

setup (threads, seed, output folder) -> model + data -> held-out metrics before -> wrap with the adapter
-> AdamW + warmup/decay schedule -> steps of gradient-accumulated micro-batches (clip, step, log,
checkpoint) -> held-out metrics after -> final adapter, metrics, loss curve, report.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from peftkit.train import checkpoint as ckpt
from peftkit.train.data import collate, length_grouped_batches, load_examples, split_examples, tokenize_all
from peftkit.train.errors import Interrupted, PeftkitError
from peftkit.train.evaluate import count_targets, default_max_new_tokens, eval_loss, exact_match
from peftkit.train.interrupts import deferred_interrupts, interrupt_hook, sigterm_as_interrupt
from peftkit.train.methods import build_peft_config
from peftkit.train.modeling import load_model_and_tokenizer, set_threads
from peftkit.train.options import RUN_DEFINING, TrainOptions
from peftkit.train.report import adapter_size_bytes, largest_change, plot_loss_curve, write_reports

BUNDLED_TRAIN, BUNDLED_EVAL = "dates_train.jsonl", "dates_eval.jsonl"


def bundled(name: str) -> str:
    """Path of a dataset file shipped inside the package."""
    return str(resources.files("peftkit").joinpath("data", name))


def train(o: TrainOptions, progress: bool = True, say=print) -> dict:
    """Run one fine-tuning job as described by ``o``; returns the report dict (also written to disk)."""
    t_start = time.time()
    threads = set_threads(o.threads)
    output = Path(o.output).expanduser()
    prepare_output(o, output)
    random.seed(o.seed)
    torch.manual_seed(o.seed)

    # ---- model and data
    train_rows, eval_rows = load_data(o)  # before the model: a bad row fails in a second, not a minute
    base, tokenizer, model_name = load_model_and_tokenizer(o.model, progress)
    train_items = tokenize_all(tokenizer, train_rows, o.max_length, "training")
    eval_rows = eval_rows[: o.eval_limit] if o.eval_limit else eval_rows
    eval_items = tokenize_all(tokenizer, eval_rows, o.max_length, "held-out") if eval_rows else []
    pad_id = tokenizer.pad_token_id
    max_new = o.max_new_tokens or (default_max_new_tokens(tokenizer, eval_rows) if eval_rows else 0)
    say(
        f"model {model_name}; {len(train_items)} training rows, {len(eval_rows)} held-out rows; {threads} threads"
    )

    # ---- held-out metrics of the base model
    before = (
        None
        if o.skip_eval_before
        else held_out_metrics(base, tokenizer, eval_rows, eval_items, max_new, progress, "before")
    )

    # ---- the adapter: fresh, or the last checkpoint when resuming
    resume_from = ckpt.latest_checkpoint(output) if o.resume else None
    saved = ckpt.read_trainer_state(resume_from) if resume_from else None
    batches_per_epoch = math.ceil(len(train_items) / o.batch_size)
    total_steps = o.max_steps or max(1, math.ceil(o.epochs * batches_per_epoch / o.grad_accum))
    model = wrap_model(base, o, resume_from, total_steps)
    if saved:
        ckpt.restore_tuner(model, saved, resume_from)
    trainable, total = model.get_nb_trainable_parameters()
    # Sorted by name, so the optimizer state of a checkpoint maps onto the same tensors on resume.
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    # AdaLoRA reallocates ranks from the gradients of each step (after the update, before zeroing them)
    allocate = getattr(model.base_model, "update_and_allocate", None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(o.scheduler, o.warmup, total_steps))
    step = ckpt.restore_trainer(saved, optimizer, scheduler) if saved else 0
    ckpt.write_json_atomic(output / "run_config.json", {**o.to_dict(), "resolved_model": model_name})
    metrics = MetricsLog(output / "metrics.jsonl", keep_until=step)
    if step == 0 and before:
        metrics.write({"step": 0, "eval_loss": before["loss"]["loss"]})
    say(
        f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%) for {total_steps} steps"
        + (f", resuming at step {step} from {resume_from}" if resume_from else "")
    )

    # ---- the loop
    lengths = [len(t.input_ids) for t in train_items]
    stream = micro_batches(lengths, o.batch_size, o.seed, start=step * o.grad_accum)
    bar = _progress_bar(total_steps, step, progress)
    model.train()
    t_train, tokens_seen, window = time.time(), 0, {"loss": 0.0, "tokens": 0, "targets": 0, "t": time.time()}
    if saved:  # the steps since the last metrics row, so the next row averages all of them
        window.update(saved.get("window", {}))
    last_loss = None
    hook = interrupt_hook()
    rng = ckpt.rng_state()  # as the last completed step left it: what a checkpoint of `step` restores
    try:
        with sigterm_as_interrupt():
            while step < total_steps:
                chunks = [
                    collate([train_items[i] for i in next(stream)], pad_id) for _ in range(o.grad_accum)
                ]
                n_targets = sum(count_targets(c["labels"]) for c in chunks)  # loss = sum over the step / this
                step_loss, step_tokens = 0.0, 0
                for batch in chunks:
                    loss = model(**batch, num_items_in_batch=n_targets).loss
                    hook(step, "forward")
                    loss.backward()
                    step_loss += loss.detach().item() * n_targets
                    step_tokens += int(batch["attention_mask"].sum())
                # The step commits as a whole: Ctrl-C from here on is raised once the counter, the RNG
                # snapshot and the metrics row have moved too, so a checkpoint never holds half a step.
                with deferred_interrupts():
                    if o.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
                    optimizer.step()
                    hook(step, "optimizer_step")
                    scheduler.step()
                    if allocate is not None:
                        allocate(step)
                    optimizer.zero_grad(set_to_none=True)
                    step, rng = step + 1, ckpt.rng_state()
                    window.update(
                        loss=window["loss"] + step_loss,
                        tokens=window["tokens"] + step_tokens,
                        targets=window["targets"] + n_targets,
                    )
                    bar.update()
                    if step % o.log_every == 0 or step == total_steps:
                        row = metrics.log_window(step, window, scheduler.get_last_lr()[0])
                        tokens_seen, last_loss = tokens_seen + row["tokens"], row["loss"]
                        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                hook(step - 1, "step_done")
                if o.save_every and step % o.save_every == 0 and step < total_steps:
                    ckpt.save_checkpoint(model, optimizer, scheduler, step, output, rng, window)
    except KeyboardInterrupt:
        bar.close()
        # the parameters, optimizer and scheduler are as step `step` left them; `rng` was taken then too
        folder = ckpt.save_checkpoint(model, optimizer, scheduler, step, output, rng, window)
        raise Interrupted(
            f"interrupted at step {step}/{total_steps}; checkpoint saved to {folder}; "
            f"continue with --resume --output {o.output}"
        ) from None
    bar.close()
    train_seconds = time.time() - t_train

    # ---- held-out metrics after, final artifacts
    after = held_out_metrics(model, tokenizer, eval_rows, eval_items, max_new, progress, "after")
    if after:
        metrics.write({"step": step, "eval_loss": after["loss"]["loss"]})
    ckpt.save_adapter_atomic(model, output / "adapter")
    plot_note = plot_loss_curve(output / "metrics.jsonl", output / "loss_curve.png")
    report = {
        "model": model_name,
        "method": o.method,
        "r": o.r,
        "alpha": o.alpha,
        "target_modules": sorted(getattr(model.peft_config["default"], "target_modules", None) or []),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "adapter_bytes": adapter_size_bytes(output / "adapter"),
        "output": str(output / "adapter"),
        "steps": step,
        "train_rows": len(train_items),
        "tokens": tokens_seen,
        "wall_seconds": time.time() - t_start,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": last_loss,
        "threads": threads,
        "cpu_seconds": cpu_seconds(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "plot_note": plot_note,
        "eval": _eval_summary(before, after),
        "largest_change": largest_change(model),
    }
    report["markdown"] = write_reports(output, report)
    return report


# ---------------------------------------------------------------- the pieces the loop calls


def prepare_output(o: TrainOptions, output: Path) -> None:
    """Refuse to mix runs: a non-empty folder needs --overwrite (or --resume with the same settings)."""
    if o.resume:
        saved = output / "run_config.json"
        if not saved.is_file():
            raise PeftkitError(f"--resume: no run to continue in {output} (run_config.json not found)")
        old, new = run_settings(json.loads(saved.read_text())), run_settings(o.to_dict())
        changed = [f"{k} (was {old[k]!r}, now {new[k]!r})" for k in RUN_DEFINING if old[k] != new[k]]
        if changed:
            raise PeftkitError(
                f"--resume: {output} holds a run with different settings: {', '.join(changed)}; "
                "resume with the saved values, or start a new run with --overwrite or another --output"
            )
        if ckpt.latest_checkpoint(output) is None:
            raise PeftkitError(f"--resume: {output} has no checkpoint yet; run again with --overwrite")
        return
    if output.exists() and not output.is_dir():
        raise PeftkitError(f"--output {output} is a file; expected a folder")
    if output.is_dir() and any(output.iterdir()):
        if not o.overwrite:
            raise PeftkitError(
                f"output folder {output} already holds files (another run?); pass --overwrite to "
                "replace it, --resume to continue it, or choose another --output"
            )
        for stale in ("metrics.jsonl", "checkpoints"):  # the old adapter stays until the new one replaces it
            path = output / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def run_settings(options: dict) -> dict:
    """The values of ``RUN_DEFINING`` that shape the run's math, from a ``TrainOptions.to_dict()``.

    --eval-split counts only where it picks the training rows (--data without --eval-data); a setting
    missing from an older run_config.json reads as None, so it counts as changed.
    """
    values = {k: options.get(k) for k in RUN_DEFINING}
    if not options.get("data") or options.get("eval_data"):
        values["eval_split"] = None
    return values


def load_data(o: TrainOptions):
    """Training and held-out examples: --data/--eval-data/--eval-split, or the bundled set."""
    if not o.data:
        train_rows = load_examples([bundled(BUNDLED_TRAIN)])
        eval_rows = load_examples(o.eval_data or [bundled(BUNDLED_EVAL)])
        return train_rows, eval_rows
    train_rows = load_examples(o.data)
    if o.eval_data:
        return train_rows, load_examples(o.eval_data)
    if o.eval_split:
        return split_examples(train_rows, o.eval_split, o.seed)
    return train_rows, []


def wrap_model(base, o: TrainOptions, resume_from: Path | None, total_steps: int):
    """The base model with a trainable adapter: a new one, or the one saved in ``resume_from``."""
    import peftkit

    if resume_from is not None:
        return peftkit.PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    targets = o.targets or ["all-linear"]
    knobs = {
        "r": o.r,
        "alpha": o.alpha,
        "dropout": o.dropout,
        "targets": "all-linear" if targets == ["all-linear"] else list(targets),
        "total_steps": total_steps,
    }
    return peftkit.get_peft_model(base, build_peft_config(o.method, knobs))


def lr_factor(kind: str, warmup: int, total: int):
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then linear/cosine/constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - done)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
        return 1.0

    return factor


def micro_batches(lengths: list[int], batch_size: int, seed: int, start: int = 0):
    """Endless stream of index batches, epoch after epoch (epoch e shuffled with seed + e); skips ``start``."""
    per_epoch = math.ceil(len(lengths) / batch_size)
    epoch, index = divmod(start, per_epoch)
    while True:
        batches = length_grouped_batches(lengths, batch_size, seed + epoch)
        yield from batches[index:]
        epoch, index = epoch + 1, 0


def held_out_metrics(model, tokenizer, rows, items, max_new: int, progress: bool, when: str) -> dict | None:
    """Held-out loss/perplexity and exact match of ``model`` (None when there is no held-out data)."""
    if not rows:
        return None
    from tqdm.auto import tqdm

    loss = eval_loss(model, items, tokenizer.pad_token_id)
    with tqdm(total=len(rows), desc=f"exact match ({when})", disable=not progress, leave=False) as bar:
        em = exact_match(model, tokenizer, rows, max_new, progress=bar)
    return {"loss": loss, "exact_match": em}


def _eval_summary(before: dict | None, after: dict | None) -> dict | None:
    if not after:
        return None
    return {
        "before": before["loss"] if before else None,
        "after": after["loss"],
        "exact_match_before": before["exact_match"] if before else None,
        "exact_match_after": after["exact_match"],
    }


class MetricsLog:
    """Append-only metrics.jsonl; on resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, keep_until: int):
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        kept = [r for r in rows if r["step"] <= keep_until] if keep_until else []
        ckpt.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.path = path

    def write(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def log_window(self, step: int, window: dict, lr: float) -> dict:
        """Write the mean loss and tokens/s since the last row, and reset the window."""
        now = time.time()
        row = {
            "step": step,
            "loss": window["loss"] / max(window["targets"], 1),
            "lr": lr,
            "tokens": window["tokens"],
            "tokens_per_s": window["tokens"] / max(now - window["t"], 1e-9),
        }
        self.write(row)
        window.update(loss=0.0, tokens=0, targets=0, t=now)
        return row


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (wall time means little on a busy machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="training", unit="step", disable=not enabled, dynamic_ncols=True
    )
