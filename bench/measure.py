"""Measuring helpers: timing series, summaries, process memory."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Series:
    """Samples of one metric for one daemon (seconds, bytes or rates)."""

    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory(pid: int) -> dict[str, int]:
    """RSS, PSS and private memory of a process in bytes (from smaps_rollup)."""
    values = {"rss": 0, "pss": 0, "private": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if not rest.strip().endswith("kB"):
                continue
            kb = int(rest.split()[0]) * 1024
            if key == "Rss":
                values["rss"] = kb
            elif key == "Pss":
                values["pss"] = kb
            elif key in ("Private_Clean", "Private_Dirty"):
                values["private"] += kb
    return values


def _meminfo() -> dict[str, int]:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            info[key] = int(value.split()[0]) * 1024
    return info


# What the kernel keeps for processes and objects that are not page cache: page tables,
# kernel stacks, unreclaimable slab (namespaces, cgroups, mounts, sockets), and shmem
# (tmpfs files such as bundles and FIFOs under /run).
_KERNEL_KEYS = ("PageTables", "KernelStack", "SUnreclaim", "Shmem")


def machine_used_memory() -> int:
    """The machine's memory that processes and the kernel hold, in bytes: the sum of every
    process's PSS (each shared page counted once over its sharers) plus the kernel's own
    per-object memory (_KERNEL_KEYS).

    Not MemTotal - MemAvailable: in a VM that figure moves by megabytes on its own (page
    cache, lazily reclaimed and ballooned memory), so a delta over 20 containers came out
    negative. This sum only moves with what starting the containers really allocated."""
    total = sum(_meminfo()[key] for key in _KERNEL_KEYS)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                total += memory(int(entry))["pss"]
            except OSError:  # gone since listed
                pass
    return total


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
