"""Checkpoints and atomic files: a run never leaves a half-written file over a good one.

A checkpoint folder ``checkpoints/step-N/`` holds the adapter (peftkit ``save_pretrained``) and
``trainer_state.pt`` (optimizer, scheduler, RNG states, step, and a tuner's own training state), so
``--resume`` continues exactly. A checkpoint holds the state of the last completed step, never part of one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

from peftkit.train.errors import PeftkitError

STATE_NAME = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_adapter_atomic(model, folder: Path, extra=None) -> None:
    """Save the adapter (and ``extra(tmp_dir)`` files) into a temp folder, then swap it in for ``folder``.

    The old folder is moved aside first and deleted only after the new one is in place.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict:
    """A snapshot of every random number generator the loop draws from (dropout masks, data order)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    model, optimizer, scheduler, step: int, output: Path, rng: dict, window: dict | None = None
) -> Path:
    """Write ``output/checkpoints/step-{step}``: the adapter plus everything needed to resume.

    ``rng`` is the RNG snapshot taken when step ``step`` completed (see ``rng_state``), not the state now:
    an interrupted step may already have drawn dropout masks. ``window`` holds the loss sum and target count
    of the steps since the last metrics row (kept, so a resumed run logs the same losses; the token count
    and time restart, as tokens/s is per process). A tuner with training state of its own
    (AdaLoRA's rank allocator and its full-rank tensors) adds it under ``"tuner"``.
    """
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "window": {k: window[k] for k in ("loss", "targets")} if window else {},
    }
    tuner_state = getattr(model.base_model, "training_state", None)
    if tuner_state is not None:
        state["tuner"] = tuner_state()
    folder = output / "checkpoints" / f"step-{step}"
    save_adapter_atomic(model, folder, extra=lambda tmp: torch.save(state, tmp / STATE_NAME))
    return folder


def latest_checkpoint(output: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output/checkpoints``, if any."""
    root = output / "checkpoints"
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()
    ]
    return max(found)[1] if found else None


def read_trainer_state(folder: Path) -> dict:
    """The ``trainer_state.pt`` of a checkpoint folder."""
    return torch.load(folder / STATE_NAME, weights_only=False)


def restore_tuner(model, state: dict, folder: Path) -> None:
    """Give the tuner its training state back (before the optimizer is built: it may replace parameters)."""
    load = getattr(model.base_model, "load_training_state", None)
    if load is None:
        return
    if "tuner" not in state:
        raise PeftkitError(
            f"--resume: {folder / STATE_NAME} lacks the {type(model.base_model).__name__} training state "
            "(written by an older peftkit), so the run cannot continue exactly; start again with --overwrite"
        )
    load(state["tuner"])


def restore_trainer(state: dict, optimizer, scheduler) -> int:
    """Restore optimizer, scheduler and RNG states from a checkpoint's state; returns its step."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
