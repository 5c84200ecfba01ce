"""Checkpoints and atomic files: a run never leaves a half-written file over a good one.

A checkpoint folder ``checkpoints/step-N/`` holds the adapter (peftkit ``save_pretrained``) and
``trainer_state.pt`` (optimizer, scheduler, RNG states, step), so ``--resume`` continues exactly.
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


def save_checkpoint(model, optimizer, scheduler, step: int, output: Path) -> Path:
    """Write ``output/checkpoints/step-{step}``: the adapter plus everything needed to resume."""
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
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


def load_trainer_state(folder: Path, optimizer, scheduler) -> int:
    """Restore optimizer, scheduler and RNG states from a checkpoint; returns its step."""
    state = torch.load(folder / STATE_NAME, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])
