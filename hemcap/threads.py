"""How many CPU threads torch should use: by default, the cores no other process is keeping busy.

PyTorch's OpenMP threads work in lock-step; when another process holds one of two cores, the
thread that shares that core is descheduled mid-op and its partner spins waiting for it. On the
project's 2-core machine, beside one busy process, the quickstart trained at 94 samples/s with 2
threads and at 205 with 1; idle, at 253 with 2 (eval/bench_threads.py, BENCHMARKS.md). So the
default is the cores we may use (``os.sched_getaffinity``) minus the cores other processes use
right now, read from the per-CPU busy time in ``/proc/stat`` over 0.15 s, less our own CPU time
(``/proc/self/stat``). Without ``/proc`` (macOS) the 1-minute load average stands in; when nothing
can be read, every core is used.

An explicit count wins: ``--threads N`` (``train.threads``), else ``OMP_NUM_THREADS`` set by the
user. ``accelerate launch`` writes ``OMP_NUM_THREADS`` for every process it starts whether asked
or not (1, or with ``--cpu`` the physical cores over the processes), so under it only
``--threads`` forces a count. Under a launcher with N local processes each takes 1/N of the free
cores. ``ThreadWatch`` re-reads the load every 30 s of training and follows it.

This module imports torch only inside ``use_threads``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SAMPLE_S = 0.15  # long enough for 15 scheduler ticks per CPU at USER_HZ=100, short enough to go unnoticed
BUSY_SHARE = 0.5  # a core counts as busy when other processes use at least half of it
RECHECK_S = 30.0  # seconds of training between re-readings of the load
ACCELERATE_MARK = "ACCELERATE_DYNAMO_BACKEND"  # set in every process `accelerate launch` starts
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


# ------------------------------------------------------------------------------ reading the load


@dataclass(frozen=True)
class Snapshot:
    """Per-CPU (busy, total) clock ticks and this process's own CPU ticks, at one moment."""

    cpus: dict[int, tuple[int, int]]
    own: int


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) clock ticks from the text of /proc/stat."""
    cpus = {}
    for line in text.splitlines():
        name, *fields = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        # user nice system idle iowait irq softirq steal (guest is in user). Niced time counts: with
        # autogroup scheduling (on here) a niced process in another session still gets its session's share.
        ticks = [int(f) for f in fields[:8]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        cpus[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return cpus


def parse_self_stat(text: str) -> int:
    """utime + stime clock ticks from the text of /proc/<pid>/stat."""
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and brackets
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after the name


def others_busy(before: Snapshot, after: Snapshot, cpus: set[int]) -> float:
    """Cores' worth of CPU time that other processes used on ``cpus`` between two snapshots."""
    shared = [c for c in cpus if c in before.cpus and c in after.cpus]
    if not shared:
        return 0.0
    busy = sum(after.cpus[c][0] - before.cpus[c][0] for c in shared)
    elapsed = sum(after.cpus[c][1] - before.cpus[c][1] for c in shared) / len(shared)
    return max(0.0, busy - (after.own - before.own)) / elapsed if elapsed > 0 else 0.0


def snapshot() -> Snapshot | None:
    """The current per-CPU and own CPU time, or None where /proc cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            cpus = parse_proc_stat(f.read())
        with open("/proc/self/stat", encoding="utf-8", errors="replace") as f:
            own = parse_self_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None
    return Snapshot(cpus, own) if cpus else None


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def busy_count(load: float) -> int:
    """Whole cores taken by ``load`` cores' worth of other work."""
    return int(load + 1 - BUSY_SHARE)


def _busy_now(cpus: set[int], sample_s: float) -> int:
    """Cores of ``cpus`` other processes keep busy: /proc over ``sample_s``, else the load average, else 0."""
    before = snapshot()
    if before is not None:
        time.sleep(sample_s)
        after = snapshot()
        if after is not None:
            return busy_count(others_busy(before, after, cpus))
    try:
        return busy_count(os.getloadavg()[0])  # lags a minute, but it is what macOS offers
    except (OSError, AttributeError):
        return 0


def free_cores(sample_s: float = SAMPLE_S) -> int:
    """Cores we may use that no other process keeps busy now (at least 1)."""
    cpus = allowed_cpus()
    return max(1, len(cpus) - _busy_now(cpus, sample_s))


# ------------------------------------------------------------------------------ choosing


def env_request() -> int | None:
    """OMP_NUM_THREADS when the user set it to a positive count (not when accelerate launch wrote it)."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if ACCELERATE_MARK in os.environ or not text.isdigit() or int(text) < 1:
        return None
    return int(text)


def local_processes() -> int:
    """Processes a launcher (torchrun, accelerate, MPI) started on this machine; 1 without one."""
    for name in LOCAL_SIZE_VARS:
        text = os.environ.get(name, "").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return 1


def forced(requested: int | None) -> int | None:
    """The explicit count: ``requested`` (checked), else the user's OMP_NUM_THREADS, else None."""
    if requested is None:
        return env_request()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"threads={requested!r} should be > 0 (or left out: the free cores)")
    return requested


def choose_threads(requested: int | None = None, processes: int = 1) -> int:
    """Threads to use: an explicit request, else this process's share of the free cores. Logs the choice."""
    explicit = forced(requested)
    if explicit is not None:
        source = "--threads" if requested is not None else f"OMP_NUM_THREADS={explicit}"
        log.info("threads: %d (%s)", explicit, source)
        return explicit
    cpus = allowed_cpus()
    busy = _busy_now(cpus, SAMPLE_S)
    threads = max(1, (len(cpus) - busy) // max(1, processes))
    share = f" per process ({processes} processes)" if processes > 1 else ""
    log.info("threads: %d of %d cores%s (%s busy with other work)", threads, len(cpus), share, busy or "none")
    return threads


def use_threads(n: int) -> int:
    """Run torch's CPU ops on ``n`` threads (inter-op threads too, if torch has not started them)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only possible before the first parallel work, and only once
        pass
    return n


# ------------------------------------------------------------------------------ following the load


class ThreadWatch:
    """During training: every ``every_s`` seconds, set torch's threads to the cores free since the last look.

    It reads /proc without waiting: the load is the other processes' CPU time over the whole
    interval. It does nothing when the count was forced, under several local processes (their
    own work would read as other work), or where /proc cannot be read.
    """

    def __init__(self, requested: int | None, processes: int = 1, every_s: float = RECHECK_S):
        self.active = forced(requested) is None and processes == 1
        self.every_s, self.cpus = every_s, allowed_cpus()
        self.last, self.due = (snapshot() if self.active else None), time.monotonic() + every_s

    def tick(self) -> int | None:
        """Call between steps; the new thread count when it changed, else None."""
        if self.last is None or time.monotonic() < self.due:
            return None
        now, self.due = snapshot(), time.monotonic() + self.every_s
        if now is None:
            return None
        busy = busy_count(others_busy(self.last, now, self.cpus))
        self.last = now
        return self._follow(max(1, len(self.cpus) - busy), busy)

    def _follow(self, threads: int, busy: int) -> int | None:
        import torch

        if threads == torch.get_num_threads():
            return None
        log.info("threads: %d -> %d of %d cores (%d busy with other work)", torch.get_num_threads(), threads,
                 len(self.cpus), busy)
        return use_threads(threads)
