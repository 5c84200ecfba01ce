"""glibc heap settings: whether large freed tensors go back to the OS at once or stay for the next one.

Two opposite needs, each set by the command that owns the process (a library import changes nothing):

- QLoRA and FSDP runs dequantize or gather a weight-sized temporary per layer. Left in the heap, the holes
  these leave between small long-lived tensors stay resident and the process grows layer by layer; served
  by their own memory map (`serve_large_allocations_by_mmap`), they are unmapped when freed.
- A plain fp32 run allocates and frees the same few activation sizes batch after batch. With glibc's
  default (dynamic) thresholds most of those blocks are handed back to the OS when freed and come back as
  fresh zeroed pages on the next batch, a minor page fault per 4 KiB: the held-out evaluation of the default
  run took 0.4-1.1 million faults per pass. `keep_freed_memory` keeps them in the heap for reuse instead.

Not glibc (musl, macOS, Windows): nothing changes. A `MALLOC_*_` environment variable the user set wins.
`peftkit train` and `peftkit eval` keep freed memory only in a process of their own (the console script sets
`command_process`), never in a program that calls them as functions.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 1 << 20  # bytes: see serve_large_allocations_by_mmap
KEEP_LIMIT = 1 << 30  # bytes: see keep_freed_memory
# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
command_process = False  # True in the `peftkit` console script (cli.run): the process is the command's own


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings (parameter, value); True if every one took effect."""
    if any(os.environ.get(name) is not None for name in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(bool(libc.mallopt(param, int(value))) for param, value in settings)
    except (OSError, AttributeError):  # not glibc
        return False


def serve_large_allocations_by_mmap(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of at least `threshold` bytes (at most 32 MiB) with its own memory
    map, unmapped when freed, instead of carving it out of the heap; True if the setting took effect.

    glibc's default threshold rises to the size of each large block freed (up to 32 MiB), after which a QLoRA
    step's per-layer temporaries (the dequantized weight, (out, in) float32, and its int32 code indices) are
    carved out of the heap, and the holes they leave between small long-lived tensors stay resident: the
    process's RSS grows layer by layer although the live tensors do not. A fixed threshold keeps those
    temporaries out of the heap. Process-wide, and only allocation placement changes.
    """
    return _mallopt((_M_MMAP_THRESHOLD, threshold))


def keep_freed_memory(limit: int = KEEP_LIMIT) -> bool:
    """Keep freed blocks of up to `limit` bytes in the heap for the next allocation instead of returning
    them to the OS; True if the settings took effect. Only in a process the command owns
    (`command_process`): a program that calls peftkit's commands as functions keeps its allocator as it is.

    Blocks below `limit` come from the heap (no memory map of their own), and the heap's free top is not
    trimmed until it exceeds `limit`. A process that runs the same shapes over and over (batches of an
    evaluation or of training) then reuses its own pages rather than faulting in fresh zeroed ones. What
    stays resident is at most what the largest batch needed at once, which the process held anyway at its
    peak; `release_freed_memory` hands the free pages back when a phase is over.
    """
    return command_process and _mallopt((_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, limit))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`), e.g. the per-tensor float copies
    a quantized load freed, so the next phase starts from what is live rather than from the high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
