"""One `peftkit train` per --output: a second run at once is refused naming the first; a lock left by a
killed run is taken over, with a message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from peftkit import cli
from peftkit.train.errors import PeftkitError
from peftkit.train.interrupts import ENV_HOOK, KILL_HOOK
from peftkit.train.lock import LOCK_NAME, OutputLock


def lock_owner(out) -> int | None:
    try:
        return json.loads((out / LOCK_NAME).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(train_args, tmp_path, capsys):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in (ENV_HOOK, KILL_HOOK)}
    first = subprocess.Popen(
        [sys.executable, "-m", "peftkit.cli", *train_args(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while lock_owner(out) != first.pid:  # the first run holds the folder...
            assert first.poll() is None and time.monotonic() < deadline, first.stderr and first.stderr.read()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # ...and keeps holding it while the second one starts
        assert cli.main(train_args(out, "--overwrite")) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"peftkit train: error: another peftkit train (pid {first.pid} on ")
        assert f"is writing to {out}; wait for it to finish" in err
        assert cli.main(train_args(out, "--resume")) == 1  # --resume too
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert cli.main(train_args(out, "--resume")) == 0  # and the folder is free again


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_message(train_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "earlier"}))
    assert (
        cli.main(train_args(out, "--max-steps", "1", "--skip-eval-before")) == 0
    )  # a new run, no --overwrite
    assert (
        f"taking over {out / LOCK_NAME}: left by a run that is no longer running (pid {dead.pid}, host here)"
        in capsys.readouterr().err
    )
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_held_against_other_opens_and_released(tmp_path):
    with OutputLock(tmp_path, say=lambda m: None):
        with pytest.raises(PeftkitError, match=f"another peftkit train \\(pid {os.getpid()} on "):
            with OutputLock(tmp_path):
                pass
    with OutputLock(tmp_path, say=lambda m: pytest.fail(m)):  # a clean release leaves no stale lock
        pass


def test_output_that_is_a_file_is_a_clear_error(train_args, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(train_args(tmp_path / "file")) == 1
    assert f"--output {tmp_path / 'file'} is a file; expected a folder" in capsys.readouterr().err


def test_without_flock_the_owners_pid_decides(tmp_path, monkeypatch):
    """Windows, or a mount without flock: a lock naming a live process is held, a dead one's is stale."""
    from peftkit.train import lock

    monkeypatch.setattr(lock, "fcntl", None)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid()}))  # alive: the process that ran us
    with pytest.raises(PeftkitError, match=f"pid {os.getppid()}"):
        with OutputLock(tmp_path):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid}))
    said = []
    with OutputLock(tmp_path, say=said.append):
        assert lock_owner(tmp_path) == os.getpid()
    assert said and f"pid {dead.pid}" in said[0]
