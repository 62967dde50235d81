"""How busy the machine is, so a timing can say whether other processes shared its cores (Linux
/proc/stat; None elsewhere). Used by the benchmarks and by the edge stage's llama.cpp timings."""
from __future__ import annotations

import os
import resource
import time

CONTENDED_CORES = 0.25  # other processes busier than this during a timing: not representative


def busy_cpu_s() -> float | None:
    """Seconds of non-idle CPU time on the whole machine (Linux), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s(children: bool = False) -> float:
    """This process's CPU seconds (all threads); with children, also its finished child processes'."""
    t = os.times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


class OtherLoad:
    """`with OtherLoad() as load: ...` -> load.cores: the average number of cores that processes
    other than this one (and its children) kept busy during the block, or None off Linux."""

    def __enter__(self):
        self._t0, self._busy0, self._own0 = time.perf_counter(), busy_cpu_s(), own_cpu_s(children=True)
        return self

    def __exit__(self, *exc):
        wall, busy = time.perf_counter() - self._t0, busy_cpu_s()
        own = own_cpu_s(children=True) - self._own0
        self.cores = None
        if busy is not None and self._busy0 is not None and wall > 0:
            self.cores = max(0.0, (busy - self._busy0 - own) / wall)
        return False


def wait_idle(threshold: float, timeout_s: float) -> float:
    """Waits (up to timeout_s) for a 1 s window in which the machine is busy below `threshold` cores;
    returns the seconds waited. No-op where /proc/stat is unavailable."""
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < timeout_s:
        b0, t0 = busy_cpu_s(), time.perf_counter()
        if b0 is None:
            break
        time.sleep(1.0)
        if (busy_cpu_s() - b0) / (time.perf_counter() - t0) < threshold:
            break
    return time.perf_counter() - t_start


def max_rss_bytes() -> int:
    import sys
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # Linux reports KiB, macOS bytes
