"""Checkpoints and atomic files: a run never leaves a half-written file over a good one.

A checkpoint folder ``checkpoints/step-N/`` holds the adapter (peftkit ``save_pretrained``) and
``trainer_state.pt`` (optimizer, scheduler, RNG states, step, and a tuner's own training state), so
``--resume`` continues exactly. A checkpoint holds the state of the last completed step, never part of one.

Every folder is written into a temp folder, flushed to disk, marked complete (``checkpoint_complete.json``,
listing each file and its size) and swapped in whole, so a run killed at any moment (SIGKILL, power loss)
leaves every earlier checkpoint and adapter loadable; ``--resume`` takes the newest complete checkpoint.
"""

from __future__ import annotations

import errno
import io
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from peftkit.atomic_files import atomic_write_bytes, recover_dir, replace_dir
from peftkit.train.errors import PeftkitError
from peftkit.train.interrupts import kill_point

STATE_NAME = "trainer_state.pt"
COMPLETE_NAME = "checkpoint_complete.json"  # written last into the temp folder: the checkpoint is whole
TMP_MARK = ".tmp-"  # temp folders are ".<name>.tmp-<random>" beside the folder they will replace
STEP_DIR = re.compile(r"^step-(\d+)$")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, flush it to disk and rename it into place."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_adapter_atomic(
    model, folder: Path, extra=None, kind: str = "adapter", output: Path | None = None
) -> None:
    """Save the adapter (and ``extra(tmp_dir)`` files) into a temp folder, then swap it in for ``folder``.

    ``folder`` holds its old contents or the complete new ones at every moment, also when the process is
    killed (``atomic_files.replace_dir``); a leftover temp folder is removed by ``clean_leftovers``. A full
    disk is a ``PeftkitError`` saying what is still intact (``output``: the run folder, to name its newest
    checkpoint). ``kind`` names the test kill point (``checkpoint`` or ``adapter``).
    """
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_MARK}", dir=folder.parent))
        model.save_pretrained(tmp)
        kill_point(f"{kind}-write")
        if extra is not None:
            extra(tmp)
        replace_dir(tmp, folder)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PeftkitError(_disk_full_message(folder, output, e)) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _disk_full_message(folder: Path, output: Path | None, e: OSError) -> str:
    kept = f"{folder} keeps its previous contents" if folder.exists() else f"{folder} was not written"
    if output is not None:
        last = latest_checkpoint(output)
        kept += f"; the newest complete checkpoint is {last}" if last else "; there is no checkpoint yet"
        if (output / "adapter" / "adapter_config.json").is_file() and folder != output / "adapter":
            kept += f", and {output / 'adapter'} is untouched"
    return (
        f"disk full ({e.strerror or e}) while saving {folder}: the partial copy was removed and nothing "
        f"saved before was lost ({kept}); free some space, then continue with --resume"
    )


def rng_state() -> dict:
    """A snapshot of every random number generator the loop draws from (dropout masks, data order)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
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

    def write_state(tmp: Path) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / STATE_NAME, buf.getvalue())
        mark_complete(tmp, step)

    save_adapter_atomic(model, folder, extra=write_state, kind="checkpoint", output=output)
    return folder


def mark_complete(folder: Path, step: int) -> None:
    """Write the completeness marker of a checkpoint folder, last: every file in it and its size."""
    files = {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_NAME
    }
    atomic_write_bytes(folder / COMPLETE_NAME, json.dumps({"step": step, "files": files}).encode())


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a whole checkpoint: its marker (written last) lists every file at its size."""
    try:
        files = json.loads((folder / COMPLETE_NAME).read_text())["files"]
        return STATE_NAME in files and all((folder / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_checkpoint(output: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output/checkpoints``, if any."""
    root = output / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return max(found)[1] if found else None


def clean_leftovers(output: Path, say) -> None:
    """Remove what a killed run left half-written in ``output``: temp folders of checkpoint and adapter saves
    (the folders they were replacing are intact), and put back a folder a non-atomic swap had moved aside.
    Checkpoint folders without their completeness marker are kept but never resumed from; each is reported."""
    for parent in (output, output / "checkpoints"):
        if not parent.is_dir():
            continue
        for p in sorted(parent.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".old") and p.is_dir():
                if recover_dir(parent / p.name[1:-4]):
                    say(f"restored {parent / p.name[1:-4]} (a save was killed while swapping it)")
                else:  # the swap was done, only the old copy's deletion was cut short
                    shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".") and TMP_MARK in p.name and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                say(f"removed {p}: an incomplete save (the run was killed while writing it)")
            elif p.name.startswith(".tmp-") and p.is_file():  # a single file's temp (atomic_files)
                p.unlink()
    root = output / "checkpoints"
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if STEP_DIR.match(p.name) and not is_complete(p):
            say(f"skipping {p}: incomplete checkpoint (no {COMPLETE_NAME} matching its files)")


def resume_point(output: Path, say) -> Path | None:
    """The checkpoint ``--resume`` continues from (the newest complete one), after cleaning up; says which."""
    clean_leftovers(output, say)
    folder = latest_checkpoint(output)
    if folder is None:
        say(
            f"--resume: no complete checkpoint in {output} (stopped before the first one); starting from step 0"
        )
    else:
        say(f"--resume: continuing from {folder}, the newest complete checkpoint")
    return folder


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
    if "numpy" in state["rng"]:
        np.random.set_state(state["rng"]["numpy"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
