"""Crash-safe writes: one file (`atomic_write_bytes`), several files that must change together
(`write_files_together`), or a whole folder (`replace_dir`).

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

import ctypes
import errno
import json
import os
import shutil
import sys
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


# ---------------------------------------------------------------- whole folders

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically


def _exchange(a: str, b: str) -> bool:
    """Swap the folders `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush the folder's files and its own entries to disk (files written without fsync, e.g. by torch)."""
    folder = os.fspath(folder)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def replace_dir(new: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Put the complete folder `new` (a sibling of `folder`) in place of `folder`, so that `folder` holds the
    old contents or the new ones at every moment, even if the process is killed (SIGKILL) half-way.

    Linux swaps the two in one `renameat2(RENAME_EXCHANGE)`; elsewhere the old folder is renamed to
    `.<name>.old` first, and `recover_dir` puts it back if the process died between the two renames.
    The old contents are deleted last.
    """
    new, folder = os.fspath(new), os.fspath(folder)
    parent = os.path.dirname(folder) or "."
    fsync_tree(new)
    if not os.path.exists(folder):
        os.rename(new, folder)
        _fsync_dir(parent)
        return
    if _exchange(new, folder):
        _fsync_dir(parent)
        shutil.rmtree(new, ignore_errors=True)  # now the old contents
        return
    old = os.path.join(parent, f".{os.path.basename(folder)}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(folder, old)
    os.rename(new, folder)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(folder: str | os.PathLike) -> bool:
    """Undo a `replace_dir` that died between its two renames (systems without an atomic swap): put the old
    folder back. True when it did."""
    folder = os.fspath(folder)
    old = os.path.join(os.path.dirname(folder) or ".", f".{os.path.basename(folder)}.old")
    if os.path.exists(folder) or not os.path.isdir(old):
        return False
    os.rename(old, folder)
    return True
