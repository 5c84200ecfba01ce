"""`peftkit train` killed with SIGKILL at random moments, restarted with `--resume`, ends with the adapter of
the uninterrupted run, bit for bit.

SIGKILL cannot be caught: whatever the resumed run continues from must already be whole on disk. Each kill
point is chosen by a seeded RNG and is either a random moment after training started (anything: mid-step,
a checkpoint or the final adapter being written, the evaluation, the report) or a named point the process
kills itself at (`PEFTKIT_TEST_KILL_AT`, to be sure the rare ones are hit: mid-checkpoint-write, mid-final-save,
during the evaluation). After every kill the newest complete checkpoint and the adapter (once written) must
load, and the next `--resume` must say where it continues from.

`PEFTKIT_KILL_POINTS` (default 3: two random moments, one named point; ~55 s of CPU) sets the number of
kills for a longer local run, `PEFTKIT_KILL_SEED` (default 0) the RNG seed, `PEFTKIT_KILL_METHOD` (default
lora) the method: `PEFTKIT_KILL_POINTS=25 pytest -s tests/train/test_kill_resume.py` (`-s` prints what each
kill hit). Run once at 26 kills (seed 1, lora: 17 runs, each bit-identical) and 6 (seed 2, adalora).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import load_file

from peftkit.train import checkpoint as ckpt
from peftkit.train.interrupts import ENV_HOOK, KILL_HOOK
from tests.train.test_resume import assert_bit_equal, final_adapter

KILL_POINTS = int(os.environ.get("PEFTKIT_KILL_POINTS", "3"))
KILL_SEED = int(os.environ.get("PEFTKIT_KILL_SEED", "0"))
METHOD = os.environ.get("PEFTKIT_KILL_METHOD", "lora")  # e.g. adalora: its allocator state must survive too
STEPS, ACCUM, SAVE_EVERY = 6, 2, 2
# dropout (RNG), 2 micro-batches per step across epoch boundaries (data position), a checkpoint every 2
# steps and a metrics row every 2 (a kill lands between them), a short evaluation after training
RUN = [
    *("--dropout", "0.1", "--grad-accum", str(ACCUM), "--max-steps", str(STEPS)),
    *("--save-every", str(SAVE_EVERY), "--log-every", "2", "--skip-eval-before", "--eval-limit", "2"),
    *("--method", METHOD),
]


class Run:
    """A `peftkit train` subprocess whose stderr lines are collected as they come, with their times."""

    def __init__(self, args: list[str], kill_at: str | None = None):
        env = {k: v for k, v in os.environ.items() if k not in (ENV_HOOK, KILL_HOOK)}
        if kill_at:
            env[KILL_HOOK] = kill_at
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peftkit.cli", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line))

    def training_started(self, timeout: float = 300) -> float | None:
        """The time the "training ..." line came, or None if the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, line in list(self.lines):
                if line.startswith("training "):
                    return t
            if self.proc.poll() is not None:
                self.reader.join(5)
                return next((t for t, x in self.lines if x.startswith("training ")), None)
            time.sleep(0.01)
        raise TimeoutError("no 'training' line")

    def wait(self) -> int:
        code = self.proc.wait(timeout=300)
        self.reader.join(10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(x for _, x in self.lines)


def done_steps(out) -> int:
    last = ckpt.latest_checkpoint(out)
    return int(last.name.split("-")[1]) if last else 0


def hook_kill(rng: random.Random, done: int) -> str:
    """A named kill point this run will reach, given it resumes after `done` completed steps."""
    left = STEPS - done
    saves = len([s for s in range(done + 1, STEPS) if s % SAVE_EVERY == 0]) + (left > 0)
    choices = {"forward": left * ACCUM, "optimizer_step": left, "checkpoint-write": saves}
    choices.update({"adapter-write": 1, "eval": 1})
    point = rng.choice([p for p, n in choices.items() if n > 0])
    return f"{point}:{rng.randint(1, choices[point])}"


def assert_saved_state_loads(out) -> None:
    """What a kill leaves is loadable: the newest complete checkpoint and, once written, the adapter."""
    last = ckpt.latest_checkpoint(out)
    if last is not None:
        load_file(str(last / "adapter_model.safetensors"))
        assert ckpt.read_trainer_state(last)["step"] == int(last.name.split("-")[1])
    if (out / "adapter").exists():
        json.loads((out / "adapter" / "adapter_config.json").read_text())
        load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_run(cut, full, log) -> None:
    """The adapter, the metrics (losses included) and the final RNG states equal the uninterrupted run's."""
    assert_bit_equal(final_adapter(cut), final_adapter(full))
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    pick = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]
    assert pick == [(r["step"], r.get("loss"), r.get("eval_loss")) for r in expected], log
    state = [ckpt.read_trainer_state(out / "checkpoints" / f"step-{STEPS}") for out in (cut, full)]
    for key in ("torch", "python", "numpy"):
        assert repr(state[0]["rng"][key]) == repr(state[1]["rng"][key]), key
    assert torch.equal(state[0]["rng"]["torch"], state[1]["rng"]["torch"])


def cleanup_notes(stderr: str) -> str:
    """What a resumed run found of the kill before it (a cut save removed, a checkpoint skipped)."""
    notes = [
        x.split(":")[0] for x in stderr.splitlines() if x.startswith(("removed ", "skipping ", "restored "))
    ]
    return f" [next run: {'; '.join(notes)}]" if notes else ""


def test_sigkilled_runs_resume_to_the_bit_identical_adapter(train_args, tmp_path):
    """Kills are spread over episodes: once a run got past training (all steps checkpointed), it is finished
    with --resume and compared, and the next kill starts a new run, so kills keep landing in training too."""
    full = tmp_path / "full"
    reference = Run([*train_args(full), *RUN])
    started = reference.training_started()
    assert reference.wait() == 0, reference.stderr
    busy = time.monotonic() - started  # training + saves + evaluation + report
    rng = random.Random(KILL_SEED)
    log, episodes = [], 0

    def finish(cut, resume) -> None:
        finished = Run([*train_args(cut), *RUN, *resume])
        assert finished.wait() == 0, finished.stderr
        if log:
            log[-1] += cleanup_notes(finished.stderr)
        assert_same_run(cut, full, log)
        log.append(f"-- {cut.name}: resumed to the bit-identical adapter")

    cut, resume, killed = tmp_path / "cut-0", [], False
    for i in range(KILL_POINTS):
        done = done_steps(cut)
        if done == STEPS:  # trained and checkpointed: finish this run, start another
            finish(cut, resume)
            episodes += 1
            cut, resume, killed, done = tmp_path / f"cut-{episodes}", [], False, 0
        if i % 2 == 0:  # a pure random moment after the "training ..." line
            delay = rng.uniform(0, busy) * max(STEPS - done, 1) / STEPS  # within what is left to do
            run = Run([*train_args(cut), *RUN, *resume])
            t0 = run.training_started()
            if t0 is not None:
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                if run.proc.poll() is None:
                    run.proc.send_signal(signal.SIGKILL)
            what = f"random +{delay:.2f}s"
        else:
            what = hook_kill(rng, done)
            run = Run([*train_args(cut), *RUN, *resume], kill_at=what)
        code = run.wait()
        assert code in (0, -signal.SIGKILL), f"kill {i} ({what}): exit {code}\n{run.stderr}"
        assert "Traceback" not in run.stderr, run.stderr
        if resume:  # each restart says where it continues from, and takes over the killed run's lock
            assert "--resume: continuing from" in run.stderr or "starting from step 0" in run.stderr
            assert not killed or "taking over" in run.stderr, run.stderr
            log[-1] += cleanup_notes(run.stderr)
        killed = code != 0
        log.append(f"kill {i}: {what} in a run from step {done}: {'killed' if killed else 'finished first'}")
        assert_saved_state_loads(cut)
        resume = ["--resume"]
    finish(cut, resume)
    print("\n".join(log))  # shown with -s: what each kill hit
