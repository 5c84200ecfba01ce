"""Ctrl-C and SIGTERM in the training loop: a checkpoint holds the last *completed* step, never half of one.

- ``sigterm_as_interrupt``: a killed run (SIGTERM) stops like Ctrl-C, so it still saves a checkpoint.
- ``deferred_interrupts``: the block that commits a step (optimizer update, schedule, rank allocation, step
  counter, RNG snapshot) runs to its end; a signal that arrives inside it is raised when it ends.
- ``interrupt_hook``: a test hook. ``PEFTKIT_INTERRUPT_AT="<step>:<phase>"`` sends this process a real
  SIGINT when the loop reaches ``phase`` of the step that starts after ``step`` completed steps, so tests
  can interrupt at a chosen point deterministically. Phases: see ``PHASES``.
- ``kill_point``: a test hook for crashes. ``PEFTKIT_TEST_KILL_AT="<point>:<n>"`` makes the process SIGKILL
  itself (nothing runs after: no handler, no ``finally``) the ``n``-th time it reaches ``point``, so tests can
  crash it mid-checkpoint-write, mid-final-save or during the evaluation. Points: see ``KILL_POINTS``.
"""

from __future__ import annotations

import os
import signal

ENV_HOOK = "PEFTKIT_INTERRUPT_AT"
# forward: after the first micro-batch's forward; optimizer_step: after optimizer.step(), before the step
# counter moves; step_done: after the step is committed, before logging and checkpointing.
PHASES = ("forward", "optimizer_step", "step_done")

KILL_HOOK = "PEFTKIT_TEST_KILL_AT"
# forward / optimizer_step: as above; checkpoint-write / adapter-write: the adapter files are in the temp
# folder, the rest not yet (a checkpoint's trainer state and marker); eval: the held-out evaluation after training.
KILL_POINTS = ("forward", "optimizer_step", "checkpoint-write", "adapter-write", "eval")
_reached: dict[str, int] = {}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class sigterm_as_interrupt:
    """Treat SIGTERM like Ctrl-C inside the loop, so a killed run still saves a checkpoint."""

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread
            self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def interrupt_hook():
    """``hook(step, phase)`` that sends SIGINT at the point named by ``$PEFTKIT_INTERRUPT_AT`` (else a no-op)."""
    at = os.environ.get(ENV_HOOK)
    if not at:
        return lambda step, phase: None
    step_text, _, phase = at.partition(":")
    if not step_text.isdigit() or phase not in PHASES:
        raise ValueError(f"{ENV_HOOK}={at!r}: expected <step>:<phase> with phase one of {', '.join(PHASES)}")
    target = (int(step_text), phase)

    def hook(step: int, phase: str) -> None:
        if (step, phase) == target:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


class deferred_interrupts:
    """Hold SIGINT and SIGTERM while the block runs; when it ends, hand them to the handlers they were for.

    Only signals with a Python handler are held (Ctrl-C's default raises KeyboardInterrupt; the loop's
    SIGTERM handler does too); an ignored signal stays ignored. Off the main thread this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.pending: list[int] = []
        self.old: dict[int, object] = {}
        for sig in self.SIGNALS:
            try:
                if callable(signal.getsignal(sig)):
                    self.old[sig] = signal.signal(sig, self._hold)
            except ValueError:  # not the main thread, where Python runs signal handlers anyway
                pass
        return self

    def _hold(self, signum, frame) -> None:
        self.pending.append(signum)

    def __exit__(self, exc_type, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        if self.pending and exc_type is None:
            first = self.pending[0]
            self.old[first](first, None)  # e.g. raises KeyboardInterrupt, now that the block is complete
        return False


def kill_point(point: str) -> None:
    """SIGKILL this process if ``$PEFTKIT_TEST_KILL_AT`` names this visit of ``point`` (else a no-op)."""
    at = os.environ.get(KILL_HOOK)
    if not at:
        return
    name, _, count = at.rpartition(":")
    if name not in KILL_POINTS or not count.isdigit():
        raise ValueError(
            f"{KILL_HOOK}={at!r}: expected <point>:<n> with point one of {', '.join(KILL_POINTS)}"
        )
    _reached[point] = _reached.get(point, 0) + 1
    if name == point and _reached[point] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
