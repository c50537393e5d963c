"""CPU threads that fit the cores other processes leave free.

PyTorch's OpenMP team has as many threads as the process has cores, and each parallel region ends at a barrier
where every thread must arrive. When another process keeps one of two cores busy, one of our threads waits for the
scheduler at every region while the others spin, and sampling the default model took 7.1-9.7 s an image instead of
0.43 s (`python bench/busy_core.py`; with one thread it stays 0.48 s). OpenMP's passive wait policy
(`OMP_WAIT_POLICY=PASSIVE`) avoids the spinning but costs every idle region a wake-up: 1.13 s on an idle machine.

So the team is sized from the cores that are free: `adapt()` (called by the sampling loop, at most every
`INTERVAL_S`) reads how much CPU time the machine spent outside this process since it last looked (/proc/stat
against the process's own times) and sets the calling thread's team to the cores left over, at least one. Nothing
changes where the user chose: `OMP_NUM_THREADS` set, or `enabled = False` (`LATENTGEN_FIXED_THREADS=1` in the
environment).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

INTERVAL_S = 0.25  # the shortest window a decision is made over
BUSY_FROM = 0.3  # another process using this share of a core or more takes the core (it runs whenever it can)
enabled = "OMP_NUM_THREADS" not in os.environ and not os.environ.get("LATENTGEN_FIXED_THREADS")

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_lock = threading.Lock()
_last: tuple[float, float, float] | None = None  # (wall, machine busy seconds, own CPU seconds)


def cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _snapshot(cpus: list[int]) -> tuple[float, float, float] | None:
    """(wall seconds, busy seconds of `cpus` since boot, this process's CPU seconds); None where /proc is not."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{n}" for n in cpus}
    busy = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:  # user nice system idle iowait irq softirq steal ...
            values = [int(v) for v in fields[1:9]]
            busy += values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    times = os.times()
    return time.monotonic(), busy / _HZ, times.user + times.system


def busy_elsewhere() -> float | None:
    """Cores' worth of CPU time that other processes used since the last call (None: too soon to tell)."""
    global _last
    with _lock:
        now = _snapshot(cores())
        if now is None:
            return None
        if _last is None or now[0] - _last[0] < INTERVAL_S:
            _last = _last or now
            return None
        wall, busy, own = (a - b for a, b in zip(now, _last))
        _last = now
    return max(0.0, (busy - own) / wall)


def free_cores() -> int | None:
    """The cores no other process is using now (None: too soon to tell)."""
    others = busy_elsewhere()
    if others is None:
        return None
    available = len(cores())
    return max(1, available - int(others + (1 - BUSY_FROM)))


_local = threading.local()


def adapt() -> int:
    """Size the calling thread's PyTorch team to the free cores; returns the threads it has now (and notes them
    for `track`)."""
    import torch

    if enabled:
        free = free_cores()
        if free is not None and free != torch.get_num_threads():
            torch.set_num_threads(free)
    n = torch.get_num_threads()
    used = getattr(_local, "used", None)
    if used is not None:
        used.add(n)
    return n


@contextlib.contextmanager
def track():
    """The team sizes `adapt` used in this thread inside the block (a set): recorded with an image, since a
    reduction split over another number of threads can change the last bits of a float."""
    outer = getattr(_local, "used", None)
    _local.used = set()
    try:
        yield _local.used
    finally:
        if outer is not None:
            outer |= _local.used
        _local.used = outer


def pin(n: int) -> None:
    """Run with `n` threads from now on, whatever is free (a replay of an image made with `n`)."""
    import torch

    global enabled
    enabled = False
    torch.set_num_threads(n)
