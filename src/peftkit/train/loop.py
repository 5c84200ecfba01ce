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

import numpy as np
import torch

from peftkit import heap
from peftkit.train import checkpoint as ckpt
from peftkit.train import distributed, eval_cache
from peftkit.train.data import collate, length_grouped_batches, load_examples, split_examples, tokenize_all
from peftkit.train.errors import Interrupted, PeftkitError
from peftkit.train.evaluate import count_targets, default_max_new_tokens
from peftkit.train.held_out import held_out
from peftkit.train.interrupts import deferred_interrupts, interrupt_hook, kill_point, sigterm_as_interrupt
from peftkit.train.lock import LOCK_NAME, OutputLock
from peftkit.train.methods import build_peft_config
from peftkit.train.modeling import load_model_and_tokenizer, set_threads
from peftkit.train.options import RUN_DEFINING, TrainOptions
from peftkit.train.report import adapter_size_bytes, largest_change, plot_loss_curve, write_reports

BUNDLED_TRAIN, BUNDLED_EVAL = "dates_train.jsonl", "dates_eval.jsonl"


def bundled(name: str) -> str:
    """Path of a dataset file shipped inside the package."""
    return str(resources.files("peftkit").joinpath("data", name))


def train(o: TrainOptions, progress: bool = True, say=print) -> dict:
    """Run one fine-tuning job as described by ``o``; returns the report dict (also written to disk).

    One run per output folder at a time (``lock.OutputLock``); a second one is refused, naming the first.
    """
    with OutputLock(Path(o.output).expanduser(), say):
        return _train(o, progress, say)


def _train(o: TrainOptions, progress: bool, say) -> dict:
    t_start = time.time()
    phases = Phases()
    threads = set_threads(o.threads)
    output = Path(o.output).expanduser()
    dist = distributed.setup(o.fsdp)  # torchrun / accelerate launch: this process's rank (see distributed.py)
    say, progress = (say, progress) if dist.main else (lambda *_: None, False)
    dist.on_main(prepare_output, o, output, dist)
    random.seed(o.seed)
    np.random.seed(o.seed % 2**32)  # not drawn from by peftkit; seeded so a resumed run restores it exactly
    torch.manual_seed(o.seed)

    # ---- model and data
    train_rows, eval_rows = load_data(o)  # before the model: a bad row fails in a second, not a minute
    lean = dist.loads_lean(o.quantize)  # FSDP2: only rank 0 reads the weights (sharded_load.py)
    base, tokenizer, model_name = load_model_and_tokenizer(
        o.model, progress, o.quantize, empty=lean and not dist.main
    )
    if not (o.quantize or dist.active):  # QLoRA, FSDP: the opposite (heap.py)
        heap.keep_freed_memory()  # each batch reuses the pages the last one freed, without page faults
    phases.mark("model_load")
    train_items = tokenize_all(tokenizer, train_rows, o.max_length, "training")
    eval_rows = eval_rows[: o.eval_limit] if o.eval_limit else eval_rows
    if eval_rows:  # fails early, naming the problem, when every held-out row is too long
        tokenize_all(tokenizer, eval_rows, o.max_length, "held-out")
    pad_id = tokenizer.pad_token_id
    max_new = o.max_new_tokens or (default_max_new_tokens(tokenizer, eval_rows) if eval_rows else 0)
    phases.mark("tokenize")
    say(
        f"model {model_name}; {len(train_items)} training rows, {len(eval_rows)} held-out rows; {threads} threads"
    )

    # ---- held-out metrics of the base model (read back when an earlier run stored them: eval_cache)
    before = None
    if not (o.skip_eval_before or lean):  # lean: measured once the weights are in place, below
        cache_key = (
            None
            if o.no_eval_cache or dist.active
            else eval_cache.key(model_name, eval_rows, o.max_length, max_new, o.quantize)
        )
        before = eval_cache.read(cache_key)
        if before is not None:
            say(
                f"base model's held-out metrics: from an earlier run ({before['measured_at']}); --no-eval-cache remeasures"
            )
        else:
            before = held_out_metrics(base, tokenizer, eval_rows, o.max_length, max_new, progress, "before")
            eval_cache.write(cache_key, before)
    phases.mark("eval_before")

    # ---- the adapter: fresh, or the last checkpoint when resuming
    resume_from = None
    if o.resume:  # rank 0 removes what a killed save left; then every rank picks the same checkpoint
        dist.on_main(ckpt.clean_leftovers, output, say)
        resume_from = ckpt.resume_point(output, say)
    dist.check_same("the checkpoint to resume from", str(resume_from))
    saved = ckpt.read_trainer_state(resume_from) if resume_from else None
    batches_per_epoch = math.ceil(len(train_items) / (o.batch_size * dist.world))
    total_steps = o.max_steps or max(1, math.ceil(o.epochs * batches_per_epoch / o.grad_accum))
    model = wrap_model(base, o, resume_from, total_steps)
    if o.gradient_checkpointing or (o.gradient_checkpointing is None and o.quantize):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if saved:
        ckpt.restore_tuner(model, saved, resume_from)
    runner = dist.wrap(model)  # forward/backward through DDP or FSDP2 with several processes; else `model`
    if lean and not o.skip_eval_before:  # the base alone: the adapter switched off, no random draw used up
        with torch.random.fork_rng(devices=[]), model.disable_adapter():
            before = held_out_metrics(base, tokenizer, eval_rows, o.max_length, max_new, progress, "before")
    trainable, total = model.get_nb_trainable_parameters()
    # Sorted by name, so the optimizer state of a checkpoint maps onto the same tensors on resume.
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused_adamw(params))
    # AdaLoRA reallocates ranks from the gradients of each step (after the update, before zeroing them)
    allocate = getattr(model.base_model, "update_and_allocate", None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(o.scheduler, o.warmup, total_steps))
    step = ckpt.restore_trainer(saved, optimizer, scheduler) if saved else 0
    if dist.main:
        run_config = {**o.to_dict(), "resolved_model": model_name, **dist.run_config(o)}
        ckpt.write_json_atomic(output / "run_config.json", run_config)
    metrics = MetricsLog(output / "metrics.jsonl" if dist.main else None, keep_until=step)
    if step == 0 and before:
        metrics.write({"step": 0, "eval_loss": before["loss"]["loss"]})
    say(
        f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%) for {total_steps} steps"
        + (f" on {dist.world} processes ({dist.mode})" if dist.active else "")
        + (f", resuming at step {step} from {resume_from}" if resume_from else "")
    )

    # ---- the loop
    lengths = [len(t.input_ids) for t in train_items]
    stream = micro_batches(lengths, o.batch_size * dist.world, o.seed, start=step * o.grad_accum)
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
                global_batches = [next(stream) for _ in range(o.grad_accum)]  # all processes' rows
                n_targets = sum(  # loss = sum over the step (all processes) / this
                    count_targets(collate([train_items[i] for i in b], pad_id)["labels"])
                    for b in global_batches
                )
                step_loss, step_tokens = 0.0, 0
                for k, (rows, weight) in enumerate(dist.shard(b) for b in global_batches):
                    batch = collate([train_items[i] for i in rows], pad_id)
                    with dist.accumulating(last=k == o.grad_accum - 1):
                        loss = runner(**batch, num_items_in_batch=n_targets).loss
                        hook(step, "forward")
                        kill_point("forward")
                        (loss * dist.backward_scale(weight)).backward()
                    step_loss += loss.detach().item() * n_targets * weight
                    step_tokens += int(batch["attention_mask"].sum()) * weight
                dist.sync_grads(params)
                step_loss, step_tokens = dist.sum(step_loss, step_tokens)
                step_tokens = int(step_tokens)
                # The step commits as a whole: Ctrl-C from here on is raised once the counter, the RNG
                # snapshot and the metrics row have moved too, so a checkpoint never holds half a step.
                with deferred_interrupts():
                    stop_if_not_finite(step_loss, params, o.max_grad_norm, step + 1, total_steps, output)
                    optimizer.step()
                    stop_if_weights_not_finite(params, step + 1, total_steps, output)
                    hook(step, "optimizer_step")
                    kill_point("optimizer_step")
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
                    if dist.main:
                        ckpt.save_checkpoint(model, optimizer, scheduler, step, output, rng, window)
                    dist.barrier()
            # Finished work is saved before anything else runs: a final checkpoint (unless resumed from it:
            # it also lets a finished run continue with a larger --max-steps), then the adapter. An
            # interrupted evaluation loses no training. Rank 0 writes; the others wait.
            if dist.main:
                if not ckpt.is_complete(output / "checkpoints" / f"step-{step}"):
                    ckpt.save_checkpoint(model, optimizer, scheduler, step, output, rng, window)
                ckpt.save_adapter_atomic(model, output / "adapter", output=output)
            dist.barrier()
    except KeyboardInterrupt:
        bar.close()
        # the parameters, optimizer and scheduler are as step `step` left them; `rng` was taken then too
        folder = output / "checkpoints" / f"step-{step}"
        if dist.main:
            folder = ckpt.save_checkpoint(model, optimizer, scheduler, step, output, rng, window)
        raise Interrupted(
            f"interrupted at step {step}/{total_steps}; checkpoint saved to {folder}; "
            f"continue with --resume --output {o.output}"
        ) from None
    bar.close()
    train_seconds = time.time() - t_train
    phases.mark("training")  # also the setup before the loop and the final checkpoint and adapter save

    # ---- held-out metrics after, final artifacts (the adapter is already saved)
    try:
        kill_point("eval")
        after = held_out_metrics(model, tokenizer, eval_rows, o.max_length, max_new, progress, "after")
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during the held-out evaluation; the trained adapter ({step}/{total_steps} steps) is "
            f"saved in {output / 'adapter'}; --resume --output {o.output} runs only the evaluation and report"
        ) from None
    phases.mark("eval_after")
    if after:
        metrics.write({"step": step, "eval_loss": after["loss"]["loss"]})
    change = largest_change(model)  # on every process: under FSDP2 it gathers the sharded weights
    if not dist.main:  # rank 0 writes the report
        dist.barrier()
        return {"markdown": ""}
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
        "batch_size": o.batch_size,  # per process
        "processes": dist.world,
        "distributed": dist.mode,
        "global_batch": o.batch_size * o.grad_accum * dist.world,
        "base_params_per_process": dist.base_params_here(model),
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
        "eval_before_cached": (before or {}).get(
            "measured_at"
        ),  # when an earlier run measured it (eval_cache)
        "largest_change": change,
    }
    phases.mark("report")  # largest change, loss curve
    report["phases"] = phases.seconds
    report["markdown"] = write_reports(output, report)
    dist.barrier()
    return report


# ---------------------------------------------------------------- the pieces the loop calls


def prepare_output(o: TrainOptions, output: Path, dist=None) -> None:
    """Refuse to mix runs: a non-empty folder needs --overwrite (or --resume with the same settings)."""
    if o.resume:
        saved = output / "run_config.json"
        if not saved.is_file():  # killed before it was written: nothing to continue, start (say so later)
            output.mkdir(parents=True, exist_ok=True)
            return
        if dist is not None:
            dist.check_resume(json.loads(saved.read_text()))
        old, new = run_settings(json.loads(saved.read_text())), run_settings(o.to_dict())
        changed = [
            f"{k} (was {old[k]!r}, now {new[k]!r})"
            for k in RUN_DEFINING
            if old[k] != new[k] and not extends_run(k, old[k], new[k])
        ]
        if changed:
            raise PeftkitError(
                f"--resume: {output} holds a run with different settings: {', '.join(changed)}; "
                "resume with the saved values, or start a new run with --overwrite or another --output"
            )
        return
    if output.exists() and not output.is_dir():
        raise PeftkitError(f"--output {output} is a file; expected a folder")
    if output.is_dir() and any(p.name != LOCK_NAME for p in output.iterdir()):
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


def extends_run(key: str, old, new) -> bool:
    """A larger --max-steps continues a run (finished or not) from its last checkpoint: the schedule is then
    the one of the longer run from that step on, as when transformers.Trainer resumes with a larger max_steps.
    """
    return key == "max_steps" and isinstance(old, int) and isinstance(new, int) and new > old


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


def fused_adamw(params: list[torch.Tensor]) -> bool | None:
    """Whether AdamW runs its fused kernel (True) or torch's default (None): fused where every parameter is a
    floating-point tensor on the CPU or a CUDA device. Measured on the default run's 420 LoRA tensors (2
    threads): 5 ms per step instead of 23-25 ms, parameters equal to 1e-8 after 10 steps."""
    ok = bool(params) and all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return True if ok else None


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


def held_out_metrics(
    model, tokenizer, rows, max_length: int, max_new: int, progress: bool, when: str
) -> dict | None:
    """Held-out loss/perplexity and exact match of ``model`` (None when there is no held-out data), computed
    in one pass over the prompts (``held_out``)."""
    if not rows:
        return None
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), desc=f"evaluation ({when})", disable=not progress, leave=False) as bar:
        loss, em = held_out(model, tokenizer, rows, max_length, max_new, progress=bar)
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
    """Append-only metrics.jsonl; on resume, rows after the checkpoint's step are dropped first.
    ``path`` None: rows are computed but not written (the processes other than rank 0)."""

    def __init__(self, path: Path | None, keep_until: int):
        self.path = path
        if path is None:
            return
        rows = [r for x in path.read_text().splitlines() if (r := _json_row(x))] if path.exists() else []
        # the held-out row at the resumed step is measured again after training
        kept = [r for r in rows if r["step"] < keep_until or (r["step"] == keep_until and "loss" in r)]
        ckpt.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        if self.path is None:
            return
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


def _json_row(line: str) -> dict | None:
    """A metrics row, or None for a blank line or the cut-off last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


def stop_if_not_finite(loss: float, params, max_norm: float, step: int, total: int, output: Path) -> None:
    """Clip the gradients to ``max_norm`` (0 = no clipping); stop the run, before the weights change, when the
    loss or the gradient norm of ``step`` is NaN/inf. The last checkpoint, written before, stays as it is."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    bad = "loss" if not math.isfinite(loss) else "gradient norm" if not math.isfinite(float(norm)) else None
    if bad is None:
        return
    last = ckpt.latest_checkpoint(output)
    raise PeftkitError(
        f"training stopped at step {step}/{total}: the {bad} is {loss if bad == 'loss' else float(norm)}; "
        f"the weights were not updated with it. The last good checkpoint is "
        f"{last if last else '(none: no checkpoint was written yet)'}. Lower --lr, or clip with "
        f"--max-grad-norm (now {max_norm}), and start again with --overwrite"
    )


def stop_if_weights_not_finite(params, step: int, total: int, output: Path) -> None:
    """Stop when the update of ``step`` overflowed a weight to inf/NaN (finite loss and gradients, absurd lr):
    nothing of this step is saved, the last checkpoint stays the last good one."""
    # One foreach norm over all of them is finite exactly when every weight is, unless their squares overflow
    # fp32: only then is each tensor looked at (~1 ms instead of ~19 ms per step for the default run's 420).
    if math.isfinite(float(torch.nn.utils.get_total_norm(params))):
        return
    if all(bool(torch.isfinite(p).all()) for p in params):
        return
    last = ckpt.latest_checkpoint(output)
    raise PeftkitError(
        f"training stopped at step {step}/{total}: its update made adapter weights inf/NaN; nothing of it was "
        f"saved. The last good checkpoint is {last if last else '(none: no checkpoint was written yet)'}. "
        "Lower --lr and start again with --overwrite"
    )


class Phases:
    """Wall seconds of each part of a run, for report.json's ``phases``: ``startup`` is from the process start
    (interpreter, imports, option parsing; None where the OS does not say) to the start of the run, then each
    ``mark(name)`` records the seconds since the previous mark."""

    def __init__(self):
        self.seconds: dict[str, float | None] = {"startup": process_age()}
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 2)
        self.last = now


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat's start time), None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return round(age, 2)


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
