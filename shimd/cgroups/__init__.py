"""Cgroup managers for v1 and v2 behind one interface, as a library for the shim and runtime.

`open(path)` picks the hierarchy this machine uses: v2 when /sys/fs/cgroup is a cgroup2
mount, v1 otherwise (a hybrid machine's hugetlb-only unified tree is ignored, as runc does).
Resources are the OCI spec's `linux.resources` object (camelCase JSON as in config.json);
`stats()` returns runc's `events --stats` data shape, the same for both versions, so the
shim builds io.containerd.cgroups.v1/v2 Metrics from one dict.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from runtimed.errors import InvalidArgument

CGROUP_ROOT = "/sys/fs/cgroup"


class OOMWatcher(Protocol):
    def fileno(self) -> int: ...

    def read(self) -> int:
        """New OOM kills since the last read (0 when the wake-up was not an OOM)."""
        ...

    def close(self) -> None: ...

    def snapshot(self, keep) -> dict:
        """What `restore_oom_watcher` needs in the shim's next worker (shimd/keeper.py)."""
        ...


def restore_oom_watcher(record: dict, fds: list[int]) -> OOMWatcher:
    if record["version"] == 1:
        from shimd.cgroups.v1 import V1OOMWatcher

        return V1OOMWatcher.restore(record, fds)
    from shimd.cgroups.v2 import V2OOMWatcher

    return V2OOMWatcher.restore(record, fds)


class Cgroup(Protocol):
    path: str

    def create(self) -> None: ...

    def update(self, resources: dict) -> None: ...

    def procs_files(self) -> list[str]:
        """The files a single-threaded process writes "0" to, to join (late) by itself
        (`tasks` on v1, where that takes no global lock; cgroup.procs on v2)."""
        ...

    def add(self, pid: int) -> None: ...

    def pids(self) -> list[int]: ...

    def freeze(self) -> None: ...

    def thaw(self) -> None: ...

    def frozen(self) -> bool: ...

    def stats(self) -> dict: ...

    def oom_events(self) -> OOMWatcher: ...

    def exists(self) -> bool: ...

    def delete(self, wait: bool = True) -> bool:
        """Remove it (and its children). Without `wait`, one that the kernel still holds
        (its last tasks leaving) is left: False."""


class _MountTable:
    """What this process needs of its /proc/self/mounts (whether CGROUP_ROOT is cgroup2,
    and the v1 hierarchies' mount points), derived again only when the kernel says the
    table changed: the file polls POLLPRI once after a mount or unmount in the namespace
    (the kernel's mounts_poll clears that mark when it reports it, so one poll sees each
    change once; reading does not touch it). Only the answer is kept, not the table, which
    grows with every container's mounts on the host (~0.5 KB a line) and would sit in
    every shim's private memory. A shim opens its container's cgroup several times
    (create, the OOM watch, kill, delete): each read of the file takes the namespace's
    lock, which mounts and unmounts (every container's) hold, and costs 0.2 ms here, 5 ms
    at the tail. A forked child opens its own (the open file description, with its offset
    and change mark, would be its parent's too) and leaves the inherited fd alone: a
    worker closes every fd it inherits, and the number may name another file by then
    (close-on-exec, it goes with the child's execve)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = 0
        self._answer: tuple[bool, dict[str, str]] | None = None

    def get(self) -> tuple[bool, dict[str, str]]:
        """(is v2, v1 controller → mount point); the same object until the table changes."""
        import select

        with self._lock:
            if self._pid != os.getpid():
                self._fd, self._answer, self._pid = -1, None, os.getpid()
            if self._fd < 0:
                self._fd = os.open("/proc/self/mounts", os.O_RDONLY | os.O_CLOEXEC)
            elif self._answer is not None:
                poll = select.poll()
                poll.register(self._fd, select.POLLPRI)
                if not poll.poll(0):
                    return self._answer
            os.lseek(self._fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(self._fd, 65536):
                chunks.append(chunk)
            table = [line.split() for line in b"".join(chunks).decode().splitlines()]
            self._answer = (_is_v2(table), _v1_mounts(table))
            return self._answer


_mounts = _MountTable()


def is_v2() -> bool:
    """Whether this machine's cgroup hierarchy (at CGROUP_ROOT) is cgroup2."""
    return _mounts.get()[0]


def v1_mounts() -> dict[str, str]:
    """Controller (or name=...) → mount point of each cgroup v1 hierarchy."""
    return dict(_mounts.get()[1])


def _is_v2(table: list[list[str]]) -> bool:
    for fields in table:
        if fields[1] == CGROUP_ROOT:
            return fields[2] == "cgroup2"
    return False


def _v1_mounts(table: list[list[str]]) -> dict[str, str]:
    mounts: dict[str, str] = {}
    for fields in table:
        if fields[2] != "cgroup":
            continue
        for opt in fields[3].split(","):
            if opt in V1_CONTROLLERS or opt.startswith("name="):
                mounts.setdefault(opt, fields[1])
    return mounts


V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
                  "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc")


def normalize(path: str) -> str:
    """Spec cgroupsPath → absolute path inside the hierarchy ("a/b" is taken as "/a/b")."""
    if ":" in path and not path.startswith("/"):
        raise InvalidArgument(f"cgroupsPath {path!r} is a systemd slice path; systemd cgroups are not supported")
    path = os.path.normpath("/" + path.lstrip("/"))
    if path == "/":
        raise InvalidArgument("cgroupsPath must name a cgroup below the root")
    return path


def open(path: str) -> Cgroup:  # noqa: A001 - the name the shim contract agreed on
    """The manager for spec cgroupsPath `path` on this machine's hierarchy.

    SHIMD_CGROUP2_ROOT=<dir> forces cgroup v2 at that mount point: on a hybrid host it
    lets the v2 code run for real on the unified tree (which has no controllers, so no
    limits; used by the tests)."""
    path = normalize(path)
    forced = os.environ.get("SHIMD_CGROUP2_ROOT")
    v2, mounts = (True, {}) if forced else _mounts.get()  # both answers from one look
    if v2:
        from shimd.cgroups.v2 import V2

        return V2(path, root=forced or CGROUP_ROOT)
    from shimd.cgroups.v1 import V1

    return V1(path, dict(mounts))
