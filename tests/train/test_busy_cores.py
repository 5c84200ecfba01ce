"""The default thread count's view of the machine: other processes' busy cores, never this process's own."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from peftkit.train import busy_cores as bc

LINUX = os.path.exists("/proc/stat")


def _stat(user: int, idle: int) -> str:
    return f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 ...\n"


def test_busy_from_samples_counts_other_processes_only():
    hz = os.sysconf("SC_CLK_TCK")
    # 2 cores for 1 s (2 * hz jiffies): 1 core's worth busy, of which 0.5 s was this process
    before, after = _stat(1000, 5000), _stat(1000 + hz, 5000 + hz)
    assert bc.busy_from_samples(before, after, own_seconds=0.0, cores=2) == pytest.approx(1.0)
    assert bc.busy_from_samples(before, after, own_seconds=0.5, cores=2) == pytest.approx(0.5)
    assert bc.busy_from_samples(before, after, own_seconds=2.0, cores=2) == 0.0  # never negative
    assert bc.busy_from_samples(before, before, own_seconds=0.0, cores=2) == 0.0  # no time passed


def _sample(seconds: float, spin: bool) -> tuple[str, str, float]:
    with open("/proc/stat") as f:
        before = f.read()
    own0, end = time.process_time(), time.time() + seconds
    while time.time() < end:
        if not spin:
            time.sleep(0.01)
    own = time.process_time() - own0
    with open("/proc/stat") as f:
        return before, f.read(), own


@pytest.mark.skipif(not LINUX, reason="/proc/stat")
def test_a_busy_process_is_seen_and_this_process_is_not():
    cores = len(os.sched_getaffinity(0))
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = bc.busy_from_samples(*_sample(0.5, spin=False), cores=cores)
    finally:
        burner.kill()
        burner.wait()
    assert busy >= 0.7  # the burner's core
    # this process spinning for the whole sample is taken out again (other work on the machine aside)
    mine = bc.busy_from_samples(*_sample(0.5, spin=True), cores=cores)
    alone = bc.busy_from_samples(*_sample(0.5, spin=False), cores=cores)
    assert mine < alone + 0.5


@pytest.mark.skipif(not LINUX, reason="/proc/stat")
def test_a_lagging_load_average_does_not_take_cores_from_an_idle_machine(monkeypatch):
    """Right after a run, the load average still reads ~2: the sample says the cores are free now."""
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(bc, "busy_from_samples", lambda *a, **k: 0.1)
    assert bc.busy_cores(2) == 0
    monkeypatch.setattr(bc, "busy_from_samples", lambda *a, **k: 1.6)  # really busy: the load average caps it
    assert bc.busy_cores(2) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))  # a burst the load average has not seen
    assert bc.busy_cores(2) == 0
