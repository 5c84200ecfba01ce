"""One ``peftkit train`` per output folder: ``<output>/.peftkit-train.lock``.

The lock is an ``flock`` on that file, which the kernel drops when its process ends however it ends (SIGKILL
included), so a dead run never blocks the next one. The file holds the owner's pid, host and start time, to
name the run that holds it; a file left by a killed run is taken over, with a message naming the dead pid.
Where ``fcntl`` does not exist (Windows) the pid alone decides: a lock whose process is gone is stale.
Under a launcher (torchrun, accelerate launch: ``$RANK`` set) only rank 0 takes it, for all the job's ranks.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from peftkit.train.errors import PeftkitError

LOCK_NAME = ".peftkit-train.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """``with OutputLock(output, say):`` holds the output folder for this process, or raises ``PeftkitError``
    naming the run (pid) that holds it."""

    def __init__(self, output: Path, say=print):
        self.path = Path(output) / LOCK_NAME
        self.say = say
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate: rank 0 holds it for the whole job
            return self
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise PeftkitError(f"--output {self.path.parent} is a file; expected a folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._try_lock(fd):
                    raise PeftkitError(self._busy_message(_read_owner(fd)))
                # the holder before us may have deleted the file as we opened it: lock the file at the path
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        owner = _read_owner(fd)
        if owner.get("pid") and owner.get("pid") != os.getpid():
            self.say(
                f"taking over {self.path}: left by a run that is no longer running "
                f"(pid {owner['pid']}{', host ' + owner['host'] if owner.get('host') else ''})"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        return self

    def _try_lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:  # a file system without flock (some network mounts): as without fcntl
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        owner = _read_owner(fd)  # no flock: the owner's pid decides
        return not (owner.get("pid") and owner["pid"] != os.getpid() and pid_alive(owner["pid"]))

    def _busy_message(self, owner: dict) -> str:
        who = f"pid {owner['pid']}" if owner.get("pid") else "another process"
        if owner.get("host"):
            who += f" on {owner['host']}"
        if owner.get("started"):
            who += f", started {owner['started']}"
        return (
            f"another peftkit train ({who}) is writing to {self.path.parent}; wait for it to finish, stop it, "
            "or choose another --output"
        )

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # still locked: a process that opened it retries on the new file
            except OSError:
                pass
            os.close(self.fd)  # releases the flock
            self.fd = None
        return False


def _read_owner(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
