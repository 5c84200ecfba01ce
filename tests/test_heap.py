"""glibc heap settings (`peftkit.heap`): a process that keeps freed memory reuses its own pages, batch after
batch, instead of faulting in fresh zeroed ones; the user's own MALLOC_* setting wins. Each case runs in a
process of its own: the settings are process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"

# Tensors of the sizes an evaluation batch allocates (8-88 MB), made and freed as batch after batch does;
# prints the minor page faults of the last four rounds (the first ones fill the heap).
_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from peftkit import heap

    if sys.argv[1] == "keep":
        heap.command_process = True  # as the console script sets it
        assert heap.keep_freed_memory()
    elif sys.argv[1] == "library":  # a program calling the commands as functions: nothing is set
        assert not heap.keep_freed_memory()
    sizes = [2_000_000, 22_000_000, 5_000_000]  # floats
    for rounds in range(8):
        if rounds == 4:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        kept = [torch.ones(n) for n in sizes]
        del kept
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    """
)


def _faults(mode: str, **env) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not GLIBC or any(k.startswith("MALLOC_") for k in os.environ), reason="glibc's settings, not the user's"
)
def test_kept_memory_is_reused_without_page_faults():
    """4 rounds of 116 MB made and freed: ~86,000 faults by default (most blocks go back to the OS and return
    as fresh pages; 4 KiB each, 118,000 if all did), none once freed memory is kept."""
    default, kept = _faults("default"), _faults("keep")
    assert default > 40_000, default
    assert kept < 2_000, kept


@pytest.mark.skipif(
    not GLIBC or any(k.startswith("MALLOC_") for k in os.environ), reason="glibc's settings, not the user's"
)
def test_a_program_calling_the_commands_keeps_its_allocator():
    """Outside the console script (`command_process` unset) keep_freed_memory changes nothing: the rounds
    fault their pages in as with glibc's defaults."""
    assert _faults("library") > 40_000


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_users_malloc_setting_wins():
    """A MALLOC_*_ variable the user set: keep_freed_memory changes nothing and says so."""
    probe = "from peftkit import heap; heap.command_process = True; print(heap.keep_freed_memory())"
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, name: "131072"}
        )
        assert out.stdout.strip() == "False", out.stderr[-2000:]
