"""How many of this machine's cores other processes keep busy right now (for the default `--threads`).

The 1-minute load average alone lags: it still reads ~2 for a minute after a run on 2 cores has finished, so
running `peftkit train` twice in a row gave the second run one thread on an idle machine (2 min 56 s instead
of ~2 min). So the count is the smaller of
- the load average (sustained load: a busy machine stays busy; a burst shorter than it is ignored), and
- a short sample of /proc/stat: the cores' busy time over `SAMPLE_SECONDS`, minus this process's own CPU
  time, so whatever the machine is doing *now*, and a finished run counts for nothing.
Where /proc/stat is missing (not Linux), the load average decides, as before.
"""

from __future__ import annotations

import os
import time

SAMPLE_SECONDS = 0.1


def _cpu_jiffies(stat_text: str) -> tuple[int, int]:
    """(total, idle) jiffies of all cores from the first line of /proc/stat ("cpu user nice system idle
    iowait irq softirq steal ..."; idle counts idle + iowait)."""
    fields = [int(v) for v in stat_text.split("\n", 1)[0].split()[1:9]]
    return sum(fields), fields[3] + fields[4]


def busy_from_samples(before: str, after: str, own_seconds: float, cores: int) -> float:
    """Cores busy with other processes between two /proc/stat readings, this process's `own_seconds` of CPU
    time over the same interval taken out (jiffies are 1/100 s: USER_HZ)."""
    total0, idle0 = _cpu_jiffies(before)
    total1, idle1 = _cpu_jiffies(after)
    elapsed = total1 - total0
    if elapsed <= 0:
        return 0.0
    others = (elapsed - (idle1 - idle0)) - own_seconds * os.sysconf("SC_CLK_TCK")
    return max(0.0, others / elapsed * cores)


def busy_cores(cores: int) -> int:
    """Whole cores other processes keep busy: min(1-minute load average, a /proc/stat sample), floored."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            before = f.read()
        own0 = time.process_time()
        time.sleep(SAMPLE_SECONDS)
        own = time.process_time() - own0
        with open("/proc/stat", encoding="ascii") as f:
            after = f.read()
    except OSError:
        return int(load)
    return int(min(load, busy_from_samples(before, after, own, cores) + 0.25))
