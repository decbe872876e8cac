"""cgroup v1: one directory per mounted controller hierarchy."""

from __future__ import annotations

import os
import time

from shimd.cgroups import files

#: Devices a container always may use, on top of the spec's rules (runc's AllowedDevices).
DEFAULT_DEVICE_RULES = (
    "c *:* m", "b *:* m", "c 1:3 rwm", "c 1:8 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 1:5 rwm",
    "c 1:9 rwm", "c 5:1 rwm", "c 136:* rwm", "c 5:2 rwm", "c 10:200 rwm",
)
_CLK_TCK = 100


class V1OOMWatcher:
    """memory.oom_control armed through cgroup.event_control; an eventfd counts OOMs."""

    def __init__(self, memory_dir: str) -> None:
        self._dir = memory_dir
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        control = os.open(os.path.join(memory_dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            files.write(os.path.join(memory_dir, "cgroup.event_control"), f"{self._efd} {control}")
        except OSError:
            os.close(self._efd)
            raise
        finally:
            os.close(control)

    def fileno(self) -> int:
        return self._efd

    def read(self) -> int:
        try:
            count = os.eventfd_read(self._efd)
        except BlockingIOError:
            return 0
        # The eventfd also fires when the cgroup is removed: that is not an OOM.
        if not os.path.exists(os.path.join(self._dir, "memory.oom_control")):
            return 0
        return count

    def snapshot(self, keep) -> dict:
        """For the shim's next worker (shimd/keeper.py): `keep(fd, wake)` hands the fd over."""
        return {"version": 1, "fd": keep(self._efd, wake=True), "dir": self._dir}

    @classmethod
    def restore(cls, record: dict, fds: list[int]) -> V1OOMWatcher:
        watcher = cls.__new__(cls)
        watcher._dir, watcher._efd = record["dir"], fds[record["fd"]]
        return watcher

    def close(self) -> None:
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1


class V1:
    """A container's cgroup in every v1 hierarchy (`mounts`: controller → mount point)."""

    version = 1

    def __init__(self, path: str, mounts: dict[str, str]) -> None:
        self.path = path
        self.mounts = mounts
        self.dirs = {ctrl: os.path.join(mnt, path.lstrip("/")) for ctrl, mnt in mounts.items()}

    def _dir(self, ctrl: str) -> str | None:
        return self.dirs.get(ctrl)

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs.values())

    def create(self) -> None:
        for ctrl, d in self.dirs.items():
            if ctrl == "cpuset":
                self._create_cpuset(d)
            else:
                try:
                    os.mkdir(d)  # the parent is there but for the first container
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    os.makedirs(d, exist_ok=True)

    def _create_cpuset(self, target: str) -> None:
        """A new cpuset is empty and refuses tasks: fill cpus and mems from the parent.
        A level made here is filled with its parent's values, known from the level above
        (read once), without reading its own empty files first."""
        current = self.mounts["cpuset"]
        above: dict[str, str] = {}  # the parent level's cpus and mems, once read
        for part in self.path.strip("/").split("/"):
            parent, current = current, os.path.join(current, part)
            try:
                os.mkdir(current)
                made = True
            except FileExistsError:
                made = False
            values = {}
            for name in ("cpuset.cpus", "cpuset.mems"):
                mine = os.path.join(current, name)
                value = "" if made else files.read(mine).strip()
                if not value:
                    if name not in above:
                        above[name] = files.read(os.path.join(parent, name)).strip()
                    value = above[name]
                    files.write(mine, value)
                values[name] = value
            above = values

    def procs_files(self) -> list[str]:
        """The `tasks` files: the joining process is single-threaded (a child just forked),
        so moving its one thread moves all of it, and a v1 write of "0" (the caller) to
        `tasks` needs no global cgroup_threadgroup_rwsem, whose first writer after a quiet
        spell waits for an RCU grace period (measured here: 14 ms, against 0.05 ms)."""
        return [os.path.join(d, "tasks") for d in self.dirs.values()]

    def add(self, pid: int) -> None:
        for d in self.dirs.values():
            files.write(os.path.join(d, "cgroup.procs"), pid)

    def pids(self) -> list[int]:
        for ctrl in ("pids", "freezer", "memory", "cpu", "name=systemd"):
            d = self._dir(ctrl)
            if d and os.path.isdir(d):
                return files.procs(d)
        for d in self.dirs.values():
            if os.path.isdir(d):
                return files.procs(d)
        return []

    # resources -----------------------------------------------------------------------

    def update(self, resources: dict) -> None:
        resources = resources or {}
        self._memory(resources.get("memory") or {})
        self._cpu(resources.get("cpu") or {})
        pids = resources.get("pids") or {}
        if "limit" in pids and self._dir("pids"):
            limit = pids["limit"]
            files.write(os.path.join(self.dirs["pids"], "pids.max"), "max" if limit <= 0 else limit)
        weight = (resources.get("blockIO") or {}).get("weight")
        if weight and self._dir("blkio"):
            path = os.path.join(self.dirs["blkio"], "blkio.weight")
            if os.path.exists(path):
                files.write(path, weight)
        if "devices" in resources and self._dir("devices"):
            self._devices(resources["devices"] or [])

    def _memory(self, mem: dict) -> None:
        d = self._dir("memory")
        if not mem or not d:
            return
        limit_file = os.path.join(d, "memory.limit_in_bytes")
        swap_file = os.path.join(d, "memory.memsw.limit_in_bytes")
        limit, swap = mem.get("limit"), mem.get("swap")
        if swap is not None and not os.path.exists(swap_file):
            swap = None  # no swap accounting on this kernel: runc ignores it as well
        if limit is not None and swap is not None:
            # memsw must stay >= limit after each write: raise memsw first when growing.
            current_swap = files.read_int(swap_file)
            if current_swap == -1 or limit <= current_swap:
                files.write(limit_file, limit)
                files.write(swap_file, swap)
            else:
                files.write(swap_file, swap)
                files.write(limit_file, limit)
        elif limit is not None:
            files.write(limit_file, limit)
        elif swap is not None:
            files.write(swap_file, swap)
        if mem.get("reservation") is not None:
            files.write(os.path.join(d, "memory.soft_limit_in_bytes"), mem["reservation"])
        if mem.get("swappiness") is not None and 0 <= mem["swappiness"] <= 100:
            files.write(os.path.join(d, "memory.swappiness"), mem["swappiness"])
        if mem.get("disableOOMKiller"):
            files.write(os.path.join(d, "memory.oom_control"), 1)

    def _cpu(self, cpu: dict) -> None:
        d = self._dir("cpu")
        if cpu and d:
            if cpu.get("shares"):
                files.write(os.path.join(d, "cpu.shares"), cpu["shares"])
            if cpu.get("period"):
                files.write(os.path.join(d, "cpu.cfs_period_us"), cpu["period"])
            if cpu.get("quota") is not None and cpu.get("quota") != 0:
                files.write(os.path.join(d, "cpu.cfs_quota_us"), cpu["quota"])
            if cpu.get("realtimePeriod"):
                files.write(os.path.join(d, "cpu.rt_period_us"), cpu["realtimePeriod"])
            if cpu.get("realtimeRuntime"):
                files.write(os.path.join(d, "cpu.rt_runtime_us"), cpu["realtimeRuntime"])
        cs = self._dir("cpuset")
        if cpu and cs:
            if cpu.get("cpus"):
                files.write(os.path.join(cs, "cpuset.cpus"), cpu["cpus"])
            if cpu.get("mems"):
                files.write(os.path.join(cs, "cpuset.mems"), cpu["mems"])

    def _devices(self, rules: list[dict]) -> None:
        """Each write() to devices.allow/deny is one rule: one open per file, not per rule."""
        d = self.dirs["devices"]
        with files.Writer() as out:
            self._device_rules(d, rules, out)

    @staticmethod
    def _device_rules(d: str, rules: list[dict], out) -> None:
        for rule in list(rules) + [{"allow": True, "raw": r} for r in DEFAULT_DEVICE_RULES]:
            if "raw" in rule:
                text = rule["raw"]
            else:
                kind = rule.get("type", "a")
                if kind == "a":
                    text = "a"
                else:
                    major = "*" if rule.get("major") in (None, -1) else rule["major"]
                    minor = "*" if rule.get("minor") in (None, -1) else rule["minor"]
                    text = f"{kind} {major}:{minor} {rule.get('access') or 'rwm'}"
            out.write(os.path.join(d, "devices.allow" if rule.get("allow") else "devices.deny"), text)

    # freezer -------------------------------------------------------------------------

    def _freezer_state(self) -> str:
        d = self._dir("freezer")
        if not d:
            raise OSError(2, "no freezer cgroup hierarchy is mounted: pause is unavailable")
        return os.path.join(d, "freezer.state")

    def freeze(self) -> None:
        state = self._freezer_state()
        for _ in range(1000):
            files.write(state, "FROZEN")
            if files.read(state).strip() == "FROZEN":
                return
            time.sleep(0.001)
        files.write(state, "THAWED")
        raise OSError(16, f"cgroup {self.path} did not freeze")

    def thaw(self) -> None:
        files.write(self._freezer_state(), "THAWED")

    def frozen(self) -> bool:
        try:
            return files.read(self._freezer_state()).strip() != "THAWED"
        except OSError:
            return False

    # stats ---------------------------------------------------------------------------

    def stats(self) -> dict:
        stats: dict = {"cpu": {}, "memory": {}, "pids": {}}
        acct = self._dir("cpuacct")
        if acct and os.path.isdir(acct):
            percpu = [int(x) for x in files.read(os.path.join(acct, "cpuacct.usage_percpu")).split()]
            times = files.read_kv(os.path.join(acct, "cpuacct.stat"))
            ns = 1_000_000_000 // _CLK_TCK
            stats["cpu"]["usage"] = {
                "total": files.read_int(os.path.join(acct, "cpuacct.usage")),
                "percpu": percpu,
                "kernel": times.get("system", 0) * ns,
                "user": times.get("user", 0) * ns,
            }
        cpu = self._dir("cpu")
        if cpu and os.path.isdir(cpu):
            st = files.read_kv(os.path.join(cpu, "cpu.stat"))
            stats["cpu"]["throttling"] = {
                "periods": st.get("nr_periods", 0),
                "throttledPeriods": st.get("nr_throttled", 0),
                "throttledTime": st.get("throttled_time", 0),
            }
        mem = self._dir("memory")
        if mem and os.path.isdir(mem):
            def entry(prefix: str) -> dict:
                p = os.path.join(mem, prefix)
                return {"limit": files.read_int(p + "limit_in_bytes"),
                        "usage": files.read_int(p + "usage_in_bytes"),
                        "max": files.read_int(p + "max_usage_in_bytes"),
                        "failcnt": files.read_int(p + "failcnt")}
            raw = files.read_kv(os.path.join(mem, "memory.stat"))
            stats["memory"] = {
                "cache": raw.get("cache", 0),
                "usage": entry("memory."),
                "swap": entry("memory.memsw."),
                "kernel": entry("memory.kmem."),
                "kernelTCP": entry("memory.kmem.tcp."),
                "raw": raw,
            }
            oom = files.read_kv(os.path.join(mem, "memory.oom_control"))
            stats["memory"]["oomKill"] = oom.get("oom_kill", 0)
        pids = self._dir("pids")
        if pids and os.path.isdir(pids):
            stats["pids"] = {"current": files.read_int(os.path.join(pids, "pids.current")),
                             "limit": max(files.read_int(os.path.join(pids, "pids.max")), 0)}
        return stats

    def oom_events(self) -> V1OOMWatcher:
        d = self._dir("memory")
        if not d:
            raise OSError(2, "no memory cgroup hierarchy is mounted: OOM events are unavailable")
        return V1OOMWatcher(d)

    def delete(self, wait: bool = True) -> bool:
        return all([files.rmdir_tree(d, wait) for d in self.dirs.values()])
