"""shimd.cgroups: v1 for real on this machine's hierarchies, v2 on a fake cgroupfs tree for
the resource files (controllers are bound to v1 here) and for real on the hybrid unified
hierarchy for what needs no controller (procs, freeze/thaw, delete)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from runtimed.errors import InvalidArgument
from shimd import cgroups
from shimd.cgroups.v1 import V1
from shimd.cgroups.v2 import V2, shares_to_weight
from tests.oci.conftest import in_child

MiB = 1024 * 1024
UNIFIED = "/sys/fs/cgroup/unified"


@pytest.fixture
def v1_group():
    group = cgroups.open(f"/runtimed-test-{uuid.uuid4().hex[:10]}/c1")
    assert isinstance(group, V1)
    group.create()
    yield group
    for pid in group.pids():
        os.kill(pid, signal.SIGKILL)
    group.delete()
    parent = V1(os.path.dirname(group.path), group.mounts)
    parent.delete()
    assert not group.exists() and not parent.exists()


def _spawn_in(group, *argv: str) -> subprocess.Popen:
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", "import os,sys; os.read(int(sys.argv[1]), 1); os.execvp(sys.argv[2], sys.argv[2:])", str(r), *argv],
                            pass_fds=(r,))
    os.close(r)
    group.add(proc.pid)
    os.write(w, b"x")
    os.close(w)
    return proc


def test_open_picks_v1_here_and_normalizes():
    assert not cgroups.is_v2()
    assert cgroups.normalize("a/b") == "/a/b"
    with pytest.raises(InvalidArgument):
        cgroups.normalize("system.slice:docker:abc")
    with pytest.raises(InvalidArgument):
        cgroups.normalize("/")


def test_v1_resources_stats_pids(v1_group):
    v1_group.update({"memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": 16 * MiB},
                     "cpu": {"shares": 300, "quota": 20000, "period": 100000, "cpus": "0", "mems": "0"},
                     "pids": {"limit": 20}})
    mem = Path(v1_group.dirs["memory"])
    assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * MiB
    assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 96 * MiB
    # Growing the limit past the current memsw needs memsw raised first.
    v1_group.update({"memory": {"limit": 200 * MiB, "swap": 300 * MiB}})
    assert int((mem / "memory.limit_in_bytes").read_text()) == 200 * MiB
    assert (Path(v1_group.dirs["cpuset"]) / "cpuset.cpus").read_text().strip() == "0"
    proc = _spawn_in(v1_group, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 30")
    try:
        assert v1_group.pids() == [proc.pid]
        deadline = time.monotonic() + 10
        while v1_group.stats()["cpu"]["usage"]["total"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        s = v1_group.stats()
        assert s["pids"] == {"current": 1, "limit": 20}
        assert s["memory"]["usage"]["limit"] == 200 * MiB
        assert s["memory"]["usage"]["max"] >= s["memory"]["usage"]["usage"] >= 0
        assert s["cpu"]["usage"]["total"] > 0 and len(s["cpu"]["usage"]["percpu"]) == os.cpu_count()
        assert s["cpu"]["throttling"]["periods"] >= 0
    finally:
        proc.kill()
        proc.wait()


def test_v1_freeze_thaw(v1_group):
    proc = _spawn_in(v1_group, "sh", "-c", "while :; do :; done")
    try:
        time.sleep(0.1)
        v1_group.freeze()
        assert v1_group.frozen()
        ticks = _ticks(proc.pid)
        time.sleep(0.2)
        assert _ticks(proc.pid) == ticks
        v1_group.thaw()
        assert not v1_group.frozen()
        time.sleep(0.2)
        assert _ticks(proc.pid) > ticks
    finally:
        proc.kill()
        proc.wait()


def test_v1_oom_events(v1_group):
    v1_group.update({"memory": {"limit": 16 * MiB, "swap": 16 * MiB}})
    watcher = v1_group.oom_events()
    try:
        assert watcher.read() == 0
        proc = _spawn_in(v1_group, "sh", "-c", "x=$(head -c 50000000 /dev/zero | tr '\\0' a)")
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        assert select.select([watcher], [], [], 5)[0]
        assert watcher.read() >= 1
    finally:
        watcher.close()


def test_v1_cpuset_parent_filled(v1_group):
    parent = Path(v1_group.mounts["cpuset"]) / v1_group.path.strip("/").split("/")[0]
    assert (parent / "cpuset.cpus").read_text().strip()
    assert (parent / "cpuset.mems").read_text().strip()


# v2 ----------------------------------------------------------------------------------

def _fake_v2(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v2_create_enables_controllers_and_writes_resources(tmp_path):
    root = _fake_v2(tmp_path)
    group = V2("/pod/c1", root=str(root))
    group.create()
    (root / "pod" / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "pod" / "cgroup.subtree_control").write_text("")
    group.create()
    assert (root / "cgroup.subtree_control").read_text() == "+cpuset +cpu +io +memory +pids"
    assert (root / "pod" / "cgroup.subtree_control").read_text() == "+cpuset +cpu +io +memory +pids"
    d = root / "pod" / "c1"
    for name in ("memory.max", "memory.swap.max", "memory.low", "cpu.weight", "cpu.max",
                 "cpuset.cpus", "cpuset.mems", "pids.max", "io.weight", "memory.high"):
        (d / name).write_text("")
    group.update({"memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": 8 * MiB},
                  "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
                  "pids": {"limit": 0}, "blockIO": {"weight": 500},
                  "unified": {"memory.high": "50000000"}})
    assert (d / "memory.max").read_text() == str(64 * MiB)
    assert (d / "memory.swap.max").read_text() == str(32 * MiB)
    assert (d / "memory.low").read_text() == str(8 * MiB)
    assert (d / "cpu.weight").read_text() == str(shares_to_weight(1024)) == "39"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (d / "cpuset.cpus").read_text() == "0-1"
    assert (d / "pids.max").read_text() == "max"
    assert (d / "memory.high").read_text() == "50000000"
    group.update({"memory": {"limit": -1, "swap": -1}, "cpu": {"quota": -1, "period": 100000}})
    assert (d / "memory.max").read_text() == "max" and (d / "memory.swap.max").read_text() == "max"
    assert (d / "cpu.max").read_text() == "max 100000"
    with pytest.raises(InvalidArgument):
        group.update({"unified": {"../escape": "1"}})


def test_v2_stats_shape_matches_v1(tmp_path):
    root = _fake_v2(tmp_path)
    d = root / "c"
    d.mkdir()
    files = {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 20\n",
        "memory.stat": "anon 4096\nfile 8192\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "memory.current": "12288\n", "memory.max": "max\n", "memory.peak": "20000\n",
        "memory.swap.current": "0\n", "memory.swap.max": "max\n",
        "pids.current": "2\n", "pids.max": "10\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    s = V2("/c", root=str(root)).stats()
    assert s["cpu"]["usage"] == {"total": 1_500_000, "kernel": 500_000, "user": 1_000_000}
    assert s["cpu"]["throttling"] == {"periods": 4, "throttledPeriods": 1, "throttledTime": 20_000}
    assert s["memory"]["usage"] == {"limit": -1, "usage": 12288, "max": 20000, "failcnt": 3}
    assert s["memory"]["raw"] == {"anon": 4096, "file": 8192} and s["memory"]["cache"] == 8192
    assert s["memory"]["oomKill"] == 1
    assert s["pids"] == {"current": 2, "limit": 10}


def test_v2_oom_watcher_counts_oom_kill_growth(tmp_path):
    d = _fake_v2(tmp_path) / "c"
    d.mkdir()
    events = d / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")
    watcher = V2("/c", root=str(d.parent)).oom_events()
    try:
        assert not select.select([watcher], [], [], 0)[0]
        events.write_text("oom 2\noom_kill 2\n")
        assert select.select([watcher], [], [], 2)[0]
        assert watcher.read() == 2
        events.write_text("oom 2\noom_kill 2\nlow 1\n")
        assert watcher.read() == 0
    finally:
        watcher.close()


@pytest.fixture
def unified_group():
    if not os.path.isdir(UNIFIED):
        pytest.fail("this machine should have a cgroup2 hierarchy at /sys/fs/cgroup/unified")
    group = V2(f"/runtimed-test-{uuid.uuid4().hex[:10]}/c1", root=UNIFIED)
    group.create()
    yield group
    for pid in group.pids():
        os.kill(pid, signal.SIGKILL)
    group.delete()
    V2(os.path.dirname(group.path), root=UNIFIED).delete()
    assert not group.exists()


def test_v2_real_procs_freeze_thaw_delete(unified_group):
    """The hybrid unified tree has no controllers, but cgroup.procs and cgroup.freeze are core."""
    proc = _spawn_in(unified_group, "sh", "-c", "while :; do :; done")
    try:
        assert unified_group.pids() == [proc.pid]
        time.sleep(0.1)
        unified_group.freeze()
        assert unified_group.frozen()
        ticks = _ticks(proc.pid)
        time.sleep(0.2)
        assert _ticks(proc.pid) == ticks
        unified_group.thaw()
        assert not unified_group.frozen()
        time.sleep(0.2)
        assert _ticks(proc.pid) > ticks
        assert unified_group.stats()["cpu"]["usage"]["total"] > 0
    finally:
        proc.kill()
        proc.wait()


def _ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


PROBE = """
import errno, sys
results = []
for path, mode in (("/dev/null", "wb"), ("/dev/kmsg", "rb"), ("/dev/kmsg", "wb")):
    try:
        open(path, mode, buffering=0).close()
        results.append("ok")
    except PermissionError:
        results.append("denied")
print(" ".join(results))
"""


def _probe_devices(group) -> str:
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", "import os,sys; os.read(int(sys.argv[1]), 1); exec(sys.argv[2])",
                             str(r), PROBE], pass_fds=(r,), stdout=subprocess.PIPE, text=True)
    os.close(r)
    group.add(proc.pid)
    os.write(w, b"x")
    os.close(w)
    out, _ = proc.communicate(30)
    return out.strip()


def test_v2_device_filter_ebpf_for_real(unified_group):
    """The eBPF device program needs no controller: it works on the hybrid unified tree."""
    assert _probe_devices(unified_group) == "ok ok ok"
    unified_group.update({"devices": [{"allow": False, "access": "rwm"}]})
    assert _probe_devices(unified_group) == "ok denied denied"
    # A later rule overrides an earlier one: read allowed, write still denied.
    unified_group.update({"devices": [{"allow": False, "access": "rwm"},
                                      {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "r"}]})
    assert _probe_devices(unified_group) == "ok ok denied"


def test_v1_device_rules_in_order(v1_group):
    """Deny all, then allow rules, then runc's defaults, each through one open file."""
    v1_group.update({"devices": [{"allow": False, "access": "rwm"},
                                 {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
                                 {"allow": True, "type": "b", "major": 7, "access": "r"}]})
    listed = (Path(v1_group.dirs["devices"]) / "devices.list").read_text().split("\n")
    assert "a *:* rwm" not in listed  # the deny-all came first
    assert "b 7:* r" in listed and "c 10:200 rwm" in listed  # the spec's and the defaults
    assert "c 1:3 rwm" in listed  # the spec's rw, then the default's rwm for /dev/null
    v1_group.update({"devices": [{"allow": False, "type": "c", "major": 1, "minor": 3, "access": "w"}]})
    listed = (Path(v1_group.dirs["devices"]) / "devices.list").read_text().split("\n")
    assert "c 1:3 rwm" in listed  # denied, then allowed again by the defaults that follow
    with pytest.raises(OSError, match="devices.allow"):
        v1_group.update({"devices": [{"allow": True, "type": "x", "access": "rwm"}]})


def test_v1_delete_removes_child_cgroups_too(v1_group):
    """A container's cgroup with cgroups below it (made inside the container): delete
    removes them all, deepest first, in every hierarchy; deleting again is a no-op."""
    child = V1(v1_group.path + "/inner/deeper", v1_group.mounts)
    child.create()
    assert all(os.path.isdir(d) for d in child.dirs.values())
    assert (Path(child.dirs["cpuset"]) / "cpuset.cpus").read_text().strip()  # filled from above
    v1_group.delete()
    assert not v1_group.exists() and not child.exists()
    v1_group.delete()


def test_v1_delete_without_waiting_leaves_a_busy_cgroup(v1_group):
    """What a shim deletes without a thread: a cgroup a process still holds is left as it
    is (False) for the delete that waits; once empty it goes at once (True)."""
    proc = _spawn_in(v1_group, "sleep", "30")
    try:
        assert v1_group.delete(wait=False) is False
        assert os.path.isdir(v1_group.dirs["pids"])
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while v1_group.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    deadline = time.monotonic() + 10
    while not v1_group.delete(wait=False) and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel lets go of a cgroup a moment after its last task
    assert not v1_group.exists()


def test_the_mount_table_is_read_again_only_after_a_change(tmp_path):
    """cgroups.open derives its answer (v2?, the v1 mount points) from /proc/self/mounts
    once and again only after a mount or unmount in this namespace (the file polls POLLPRI
    then); only that answer is kept, not the table; a forked child reads its own. Run in a
    child with a private mount namespace, so other mounts on this machine stay out."""
    from shimd.cgroups import _mounts
    from shimd.oci import linux

    def scenario() -> None:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        first = _mounts.get()
        assert first[0] is False and first[1]["memory"] == "/sys/fs/cgroup/memory"
        assert _mounts.get() is first  # nothing changed: not read again
        assert [type(v) for v in vars(_mounts).values()].count(list) == 0  # no table kept
        target = tmp_path / "m"
        target.mkdir()
        linux.mount("s4test", str(target), "tmpfs", 0, "size=1m")
        mounted = _mounts.get()
        assert mounted is not first and mounted == first  # read again, the same answer
        assert _mounts.get() is mounted
        linux.umount(str(target))
        linux.umount("/sys/fs/cgroup/memory", linux.MNT_DETACH)  # this namespace's only
        unmounted = _mounts.get()
        assert "memory" not in unmounted[1] and "cpuset" in unmounted[1]
        assert cgroups.v1_mounts() == unmounted[1]
        pid = os.fork()
        if pid == 0:  # as a worker does: every inherited fd closed first
            code = 3
            try:
                os.closerange(3, 4096)
                code = 0 if _mounts.get() == unmounted else 2
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert _mounts.get() is unmounted  # the parent's answer still stands

    in_child(scenario)
