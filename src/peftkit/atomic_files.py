"""Crash-safe writes: one file (`atomic_write_bytes`) or several files that must change together.

An adapter is a pair, `adapter_config.json` + `adapter_model.safetensors`, and a reader must never see new
weights beside an old config. Renaming two files is two steps, so a pair is written as a small redo log:

1. every new file goes to a temporary name in the same folder, flushed to disk;
2. `.peftkit-pending.json` (the commit point) is written atomically, listing temporary name -> final name;
3. the renames run, then the log is deleted.

A failure before step 2 leaves the previous files untouched (and the temporaries are removed); a crash after
it is finished by the next reader or writer (`finish_pending_writes` redoes the remaining renames). Only the
named files are replaced: anything else in the folder (a Trainer checkpoint, other adapters' sub-folders, a
user's README) is never touched.
"""

from __future__ import annotations

import json
import os
import tempfile

PENDING_NAME = ".peftkit-pending.json"
_TMP_PREFIX = ".tmp-"


def _write_temp(directory: str, name: str, data: bytes) -> str:
    """Write `data` to a new temporary file in `directory` (flushed to disk); returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix="-" + name, dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: str) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it into place.

    A failure half-way (disk full, process killed) leaves any existing file at `path` untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = _write_temp(directory, os.path.basename(path), data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_files_together(directory: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Replace the files `files` names (file name -> contents) in `directory` so that a reader sees either
    all the old contents or all the new ones, even if the process dies part-way (see the module docstring)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    finish_pending_writes(directory)  # an earlier interrupted save must not be finished over this one
    staged: dict[str, str] = {}
    try:
        for name, data in files.items():
            staged[name] = _write_temp(directory, name, data)
        log = {os.path.basename(tmp): name for name, tmp in staged.items()}
        atomic_write_bytes(os.path.join(directory, PENDING_NAME), json.dumps(log).encode())
    except BaseException:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    finish_pending_writes(directory)


def finish_pending_writes(directory: str | os.PathLike) -> None:
    """Complete a `write_files_together` that stopped after its commit point; a no-op when none did.

    Readers call this before reading a file set, so they see the finished new set. In a folder they cannot
    write to, the error of the first rename propagates (the folder needs its owner to finish the save).
    """
    directory = os.fspath(directory)
    log_path = os.path.join(directory, PENDING_NAME)
    if not os.path.isfile(log_path):
        return
    with open(log_path, encoding="utf-8") as fh:
        log = json.load(fh)
    for tmp, name in log.items():
        tmp_path = os.path.join(directory, tmp)
        if os.path.exists(tmp_path):  # absent: this rename already happened before the crash
            os.replace(tmp_path, os.path.join(directory, name))
    _fsync_dir(directory)
    os.unlink(log_path)
