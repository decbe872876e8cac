"""cgroup v2: one unified directory; controllers enabled down the tree via subtree_control."""

from __future__ import annotations

import ctypes
import os
import time

from runtimed.errors import InvalidArgument
from shimd.cgroups import CGROUP_ROOT, files

_IN_MODIFY = 0x2
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_WANTED = ("cpuset", "cpu", "io", "memory", "pids", "hugetlb")


def shares_to_weight(shares: int) -> int:
    """cpu.shares [2, 262144] → cpu.weight [1, 10000], the conversion runc and crun use."""
    if shares == 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


class V2OOMWatcher:
    """inotify on memory.events; read() returns the growth of its oom_kill counter."""

    def __init__(self, directory: str) -> None:
        self._events = os.path.join(directory, "memory.events")
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self._fd, os.fsencode(self._events), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify watch {self._events}: {os.strerror(err)}")
        self._seen = files.read_kv(self._events).get("oom_kill", 0)

    def fileno(self) -> int:
        return self._fd

    def read(self) -> int:
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass
        now = files.read_kv(self._events).get("oom_kill", self._seen)
        new, self._seen = max(now - self._seen, 0), now
        return new

    def snapshot(self, keep) -> dict:
        """For the shim's next worker (shimd/keeper.py): `keep(fd, wake, counter)` hands the
        fd over. memory.events changes on every reclaim at memory.max, so the keeper forks a
        worker for it only once `oom_kill` is no longer what this worker saw."""
        return {"version": 2, "events": self._events, "seen": self._seen,
                "fd": keep(self._fd, wake=True, counter=(self._events, "oom_kill", self._seen))}

    @classmethod
    def restore(cls, record: dict, fds: list[int]) -> V2OOMWatcher:
        watcher = cls.__new__(cls)
        watcher._events, watcher._seen = record["events"], record["seen"]
        watcher._fd = fds[record["fd"]]
        return watcher

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class V2:
    version = 2

    def __init__(self, path: str, root: str = CGROUP_ROOT) -> None:
        self.path = path
        self.root = root
        self.dir = os.path.join(root, path.lstrip("/"))

    def exists(self) -> bool:
        return os.path.isdir(self.dir)

    def create(self) -> None:
        """mkdir the path, enabling the available controllers in each ancestor's subtree."""
        current = self.root
        for part in self.path.strip("/").split("/"):
            try:
                available = files.read(os.path.join(current, "cgroup.controllers")).split()
            except FileNotFoundError:
                available = []
            enable = " ".join(f"+{c}" for c in _WANTED if c in available)
            if enable:
                files.write(os.path.join(current, "cgroup.subtree_control"), enable)
            current = os.path.join(current, part)
            os.makedirs(current, exist_ok=True)

    def procs_files(self) -> list[str]:
        return [os.path.join(self.dir, "cgroup.procs")]

    def add(self, pid: int) -> None:
        files.write(os.path.join(self.dir, "cgroup.procs"), pid)

    def pids(self) -> list[int]:
        return files.procs(self.dir) if os.path.isdir(self.dir) else []

    def _file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def update(self, resources: dict) -> None:
        resources = resources or {}
        mem = resources.get("memory") or {}
        if mem.get("limit") is not None:
            files.write(self._file("memory.max"), "max" if mem["limit"] < 0 else mem["limit"])
        if mem.get("swap") is not None:
            # The spec's swap is memory+swap (v1 memsw); v2 limits swap alone.
            swap = mem["swap"]
            if swap < 0:
                value = "max"
            elif mem.get("limit") is None or mem["limit"] < 0:
                raise InvalidArgument("memory.swap needs memory.limit on cgroup v2")
            else:
                value = str(max(swap - mem["limit"], 0))
            files.write(self._file("memory.swap.max"), value)
        if mem.get("reservation") is not None:
            files.write(self._file("memory.low"), mem["reservation"])
        cpu = resources.get("cpu") or {}
        if cpu.get("shares"):
            files.write(self._file("cpu.weight"), shares_to_weight(cpu["shares"]))
        if cpu.get("quota") is not None or cpu.get("period"):
            quota = cpu.get("quota")
            period = cpu.get("period") or 100000
            files.write(self._file("cpu.max"), f"{'max' if quota is None or quota <= 0 else quota} {period}")
        if cpu.get("cpus"):
            files.write(self._file("cpuset.cpus"), cpu["cpus"])
        if cpu.get("mems"):
            files.write(self._file("cpuset.mems"), cpu["mems"])
        pids = resources.get("pids") or {}
        if "limit" in pids:
            files.write(self._file("pids.max"), "max" if pids["limit"] <= 0 else pids["limit"])
        weight = (resources.get("blockIO") or {}).get("weight")
        if weight:
            files.write(self._file("io.weight"), f"default {1 + (weight - 10) * 9999 // 990}")
        if "devices" in resources:
            from shimd.cgroups import devices_bpf
            from shimd.cgroups.v1 import DEFAULT_DEVICE_RULES

            rules = list(resources["devices"] or []) + [devices_bpf.parse_rule(r) for r in DEFAULT_DEVICE_RULES]
            devices_bpf.attach(self.dir, rules)
        for key, value in (resources.get("unified") or {}).items():
            if "/" in key or key.startswith("."):
                raise InvalidArgument(f"unified resource key {key!r} is not a cgroup file name")
            files.write(self._file(key), value)

    def freeze(self) -> None:
        self._set_frozen(1)

    def thaw(self) -> None:
        self._set_frozen(0)

    def _set_frozen(self, value: int) -> None:
        files.write(self._file("cgroup.freeze"), value)
        for _ in range(2000):
            if self.frozen() == bool(value):
                return
            time.sleep(0.001)
        raise OSError(16, f"cgroup {self.path} did not {'freeze' if value else 'thaw'}")

    def frozen(self) -> bool:
        return files.read_kv(self._file("cgroup.events")).get("frozen", 0) == 1

    def stats(self) -> dict:
        cpu = files.read_kv(self._file("cpu.stat"))
        raw = files.read_kv(self._file("memory.stat"))
        events = files.read_kv(self._file("memory.events"))
        return {
            "cpu": {
                "usage": {"total": cpu.get("usage_usec", 0) * 1000,
                          "kernel": cpu.get("system_usec", 0) * 1000,
                          "user": cpu.get("user_usec", 0) * 1000},
                "throttling": {"periods": cpu.get("nr_periods", 0),
                               "throttledPeriods": cpu.get("nr_throttled", 0),
                               "throttledTime": cpu.get("throttled_usec", 0) * 1000},
            },
            "memory": {
                "cache": raw.get("file", 0),
                "usage": {"limit": files.read_int(self._file("memory.max")),
                          "usage": max(files.read_int(self._file("memory.current")), 0),
                          "max": max(files.read_int(self._file("memory.peak")), 0),
                          "failcnt": events.get("max", 0)},
                "swap": {"limit": files.read_int(self._file("memory.swap.max")),
                         "usage": max(files.read_int(self._file("memory.swap.current")), 0)},
                "raw": raw,
                "events": events,
                "oomKill": events.get("oom_kill", 0),
            },
            "pids": {"current": max(files.read_int(self._file("pids.current")), 0),
                     "limit": max(files.read_int(self._file("pids.max")), 0)},
        }

    def oom_events(self) -> V2OOMWatcher:
        return V2OOMWatcher(self.dir)

    def delete(self, wait: bool = True) -> bool:
        return files.rmdir_tree(self.dir, wait)

