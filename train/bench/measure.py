"""Timing, memory and CPU-contention helpers shared by the JAX and the PyTorch side of the bench.

Timing dicts: step_times_s (timed steps, warm-up excluded), median_s, min_s, max_s, tokens_per_s
(tokens per step / median), peak_mem_bytes and peak_mem_kind:
  "cpu_max_rss_delta"                      growth of the process peak RSS over the section (a lower
                                           bound: 0 when an earlier section peaked higher)
  "cuda_max_memory_allocated"              torch, over the section (stats reset first)
  "jax_device_peak_bytes_in_use_lifetime"  JAX's device peak (process lifetime: monotone over sections)

Contention: `Section.other_cpu_cores` is the average number of cores other processes kept busy during
the section (Linux /proc/stat minus this process's CPU time); `retrying` re-measures a contended
section once the machine is idle.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from olmo_jax.cpuload import busy_cpu_s, max_rss_bytes, own_cpu_s, wait_idle  # noqa: F401 (shared helpers)

TIMING_KEYS = ("step_times_s", "median_s", "min_s", "max_s", "tokens_per_s", "peak_mem_bytes", "peak_mem_kind")


def check_steps(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")


def summary(times: list[float], tokens_per_step: int, peak_bytes: int, peak_kind: str) -> dict[str, Any]:
    med = statistics.median(times)
    return {"step_times_s": list(times), "median_s": med, "min_s": min(times), "max_s": max(times),
            "tokens_per_s": tokens_per_step / med, "peak_mem_bytes": int(peak_bytes), "peak_mem_kind": peak_kind}


class Section:
    """Peak memory and CPU contention of one measured section.

    device_peak: a function returning the accelerator's peak bytes in use (JAX's device stats), or
    None: the section then reports the growth of the host's peak RSS."""

    def __init__(self, device_peak: Callable[[], int | None] | None = None):
        self._device_peak = device_peak

    def __enter__(self):
        on_device = self._device_peak is not None and self._device_peak() is not None
        self.kind = "jax_device_peak_bytes_in_use_lifetime" if on_device else "cpu_max_rss_delta"
        self._rss0 = max_rss_bytes()
        self.start_contention()
        return self

    def start_contention(self):
        self._t0, self._busy0, self._own0 = time.perf_counter(), busy_cpu_s(), own_cpu_s()

    def __exit__(self, *exc):
        self.peak = (int(self._device_peak()) if self.kind != "cpu_max_rss_delta"
                     else max(0, max_rss_bytes() - self._rss0))
        wall = time.perf_counter() - self._t0
        busy = busy_cpu_s()
        self.own_cpu_s = own_cpu_s() - self._own0  # this process's CPU seconds (all threads)
        self.other_cpu_cores = None
        if busy is not None and self._busy0 is not None and wall > 0:
            self.other_cpu_cores = max(0.0, (busy - self._busy0 - self.own_cpu_s) / wall)
        return False

    def summary(self, times: list[float], tokens_per_step: int) -> dict[str, Any]:
        return summary(times, tokens_per_step, self.peak, self.kind) | {
            "other_cpu_cores": self.other_cpu_cores, "cpu_s_per_step": self.own_cpu_s / len(times)}


def retrying(fn: Callable[[], dict], *, retries: int, threshold: float, idle_wait_s: float,
             log: Callable[[str], None], label: str) -> dict[str, Any]:
    """Runs fn() -> timing dict; while other processes kept more than `threshold` cores busy during
    it, waits for an idle machine and measures again (`retries` times at most). Returns the least
    contended attempt, with `attempts`."""
    best = None
    for attempt in range(int(retries) + 1):
        if attempt:
            waited = wait_idle(threshold, idle_wait_s)
            log(f"{label}: contended, re-measuring (attempt {attempt + 1}, waited {waited:.0f} s)")
        out = dict(fn(), attempts=attempt + 1)
        other = out.get("other_cpu_cores")
        if best is None or (other is not None and other < (best.get("other_cpu_cores") or 0.0)):
            best = out
        if other is None or other <= threshold:
            break
    best["attempts"] = out["attempts"]
    return best
