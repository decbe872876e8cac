"""The behaviour suite: the same bundles through the built-in runtime and runc.

Every test is parametrized over both runtimes with the same expected values, so a pass on
both means the results agree with runc; the `*_like_runc` tests compare outputs directly
where spelling out the expectation would only restate runc.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.oci.conftest import REPO, make_rootfs

MiB = 1024 * 1024


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_hostname_pid1_env_cwd_and_exit_code(runtime):
    spec = runtime.spec(sh('hostname; echo pid=$$; echo "$FOO"; pwd; cat /proc/1/cmdline; echo; exit 7'))
    spec["process"]["env"].append("FOO=bar baz")
    spec["process"]["cwd"] = "/tmp/work"
    c = runtime.run_to_exit(spec)
    assert c.wait() == 7
    assert c.stdout.splitlines() == ["box", "pid=1", "bar baz", "/tmp/work", "sh\0-c\0" + spec["process"]["args"][2] + "\0"]


@pytest.mark.parametrize("code", [0, 1, 255])
def test_exit_codes(runtime, code):
    c = runtime.run_to_exit(runtime.spec(sh(f"exit {code}")))
    assert c.wait() == code


def test_kill_signals_and_trapped_term(runtime):
    c = runtime.create(runtime.spec(["sleep", "100"]))
    c.start()
    runtime.check("kill", c.id, "KILL")
    assert c.wait() == 128 + signal.SIGKILL
    assert os.WIFSIGNALED(c.status) and os.WTERMSIG(c.status) == signal.SIGKILL

    t = runtime.create(runtime.spec(sh("trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done")))
    t.start()
    _wait_for(lambda: "ready" in t.stdout)
    runtime.check("kill", t.id, "TERM")
    assert t.wait() == 42


def test_lifecycle_states_and_errors(runtime):
    c = runtime.create(runtime.spec(["sleep", "100"]))
    st = c.state()
    assert st["status"] == "created" and st["pid"] == c.pid and st["id"] == c.id
    # Created: the init is held before exec, still in the runtime's code, not sleep.
    assert open(f"/proc/{c.pid}/cmdline", "rb").read().split(b"\0")[0] != b"sleep"
    c.start()
    _wait_for(lambda: open(f"/proc/{c.pid}/cmdline", "rb").read().startswith(b"sleep"))
    assert c.state()["status"] == "running"
    assert runtime.run("start", c.id).returncode != 0
    assert runtime.run("delete", c.id).returncode != 0, "deleting a running container needs --force"
    assert json.loads(runtime.check("ps", "--format", "json", c.id).stdout) == [c.pid]
    runtime.check("kill", c.id, "9")
    c.wait()
    assert c.state()["status"] == "stopped"
    assert runtime.run("kill", c.id, "9").returncode != 0
    runtime.check("delete", c.id)
    assert runtime.run("state", c.id).returncode != 0
    assert not os.path.exists(f"/proc/{c.pid}")


def test_delete_force_running_and_delete_created(runtime):
    running = runtime.create(runtime.spec(sh("sleep 100 & sleep 100")))
    running.start()
    held = runtime.create(runtime.spec(["true"]))
    runtime.check("delete", "--force", running.id)
    runtime.check("delete", held.id)
    assert running.wait() == 128 + signal.SIGKILL
    assert held.wait() == 128 + signal.SIGKILL


def _mount_table(stdout: str) -> set[tuple[str, str, str]]:
    rows = set()
    for line in stdout.splitlines():
        _src, target, fstype, opts = line.split()[:4]
        rows.add((target, fstype, opts.split(",")[0]))
    return rows


def test_mounts_like_runc(builtin, runc):
    spec = builtin.spec(["cat", "/proc/self/mounts"])
    spec["mounts"].append({"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "size=1m"]})
    ours = builtin.run_to_exit(spec)
    theirs = runc.run_to_exit(spec)
    assert ours.wait() == theirs.wait() == 0
    table = _mount_table(ours.stdout)
    assert table == _mount_table(theirs.stdout)
    root_rows = [row for row in table if row[0] == "/"]
    assert len(root_rows) == 1 and root_rows[0][2] == "ro"
    for row in [("/proc", "proc", "rw"), ("/dev", "tmpfs", "rw"), ("/dev/pts", "devpts", "rw"),
                ("/dev/shm", "tmpfs", "rw"), ("/dev/mqueue", "mqueue", "rw"), ("/sys", "sysfs", "ro"),
                ("/data", "tmpfs", "rw"), ("/proc/sys", "proc", "ro")]:
        assert row in table


def test_bind_mount_readonly_and_propagation(runtime, tmp_path):
    src = tmp_path / f"src-{runtime.name}"
    src.mkdir()
    (src / "hello").write_text("from the host\n")
    spec = runtime.spec(sh("cat /mnt/hello; touch /mnt/x 2>&1; grep ' /mnt ' /proc/self/mountinfo"))
    spec["mounts"].append({"destination": "/mnt", "type": "bind", "source": str(src),
                           "options": ["rbind", "ro", "rprivate"]})
    c = runtime.run_to_exit(spec)
    assert c.stdout.splitlines()[0] == "from the host"
    assert "Read-only file system" in c.stdout
    assert " ro," in c.stdout.splitlines()[-1] or " ro " in c.stdout.splitlines()[-1]
    assert not (src / "x").exists()


def test_default_devices_and_symlinks(runtime):
    c = runtime.run_to_exit(runtime.spec(sh(
        "for d in null zero full random urandom tty; do stat -c '%n %t:%T %a' /dev/$d; done;"
        " for l in fd stdin stdout stderr ptmx; do readlink /dev/$l; done; head -c 4 /dev/zero | wc -c")))
    assert c.wait() == 0, c.stderr
    assert c.stdout.splitlines() == [
        "/dev/null 1:3 666", "/dev/zero 1:5 666", "/dev/full 1:7 666", "/dev/random 1:8 666",
        "/dev/urandom 1:9 666", "/dev/tty 5:0 666",
        "/proc/self/fd", "/proc/self/fd/0", "/proc/self/fd/1", "/proc/self/fd/2", "pts/ptmx", "4"]


CAPS = {
    "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN"],
    "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID"],
    "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_NET_RAW"],
    "inheritable": ["CAP_KILL", "CAP_NET_RAW"],
    "ambient": ["CAP_KILL"],
}


def _mask(*numbers: int) -> str:
    return f"{sum(1 << n for n in numbers):016x}"


def test_capability_sets(runtime):
    spec = runtime.spec(sh("grep -E '^(Cap|NoNewPrivs)' /proc/self/status"))
    spec["process"]["capabilities"] = CAPS
    c = runtime.run_to_exit(spec)
    status = dict(line.split(":\t") for line in c.stdout.splitlines())
    # sh is exec'd by execve as root: P' = (P & I) | ... for uid 0 the file caps are full
    # (root), so what we check is the bounding set and the ambient/inheritable ones.
    assert status["CapBnd"] == _mask(0, 5, 13, 7, 6, 21)
    assert status["CapInh"] == _mask(5, 13)
    assert status["CapAmb"] == _mask(5)
    assert status["NoNewPrivs"] == "1"


def test_capabilities_like_runc_as_non_root(builtin, runc):
    outs = []
    for rt in (builtin, runc):
        spec = rt.spec(["grep", "^Cap", "/proc/self/status"])
        spec["process"]["capabilities"] = CAPS
        spec["process"]["user"] = {"uid": 1000, "gid": 1000}
        c = rt.run_to_exit(spec)
        assert c.wait() == 0, c.stderr
        outs.append(c.stdout)
    assert outs[0] == outs[1]
    status = dict(line.split(":\t") for line in outs[0].splitlines())
    assert status["CapEff"] == status["CapPrm"] == status["CapAmb"] == _mask(5)


def test_user_groups_and_umask(runtime):
    spec = runtime.spec(sh("id -u; id -g; id -G; umask; touch /tmp/f; stat -c %a /tmp/f"))
    spec["process"]["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [10, 20], "umask": 0o027}
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]})
    c = runtime.run_to_exit(spec)
    assert c.wait() == 0, c.stderr
    assert c.stdout.splitlines() == ["1000", "1001", "1001 10 20", "0027", "640"]


def test_rlimits(runtime):
    spec = runtime.spec(["cat", "/proc/self/limits"])
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 768},
                                  {"type": "RLIMIT_CORE", "soft": 0, "hard": 1 << 20},
                                  {"type": "RLIMIT_NPROC", "soft": 300, "hard": 400}]
    c = runtime.run_to_exit(spec)
    limits = {line[:26].strip(): line[26:].split()[:2] for line in c.stdout.splitlines()[1:]}
    assert limits["Max open files"] == ["512", "768"]
    assert limits["Max core file size"] == ["0", str(1 << 20)]
    assert limits["Max processes"] == ["300", "400"]


def test_readonly_rootfs(runtime):
    c = runtime.run_to_exit(runtime.spec(sh("touch /x")))
    assert c.wait() == 1 and "Read-only file system" in c.stderr
    spec = runtime.spec(sh("touch /x && echo wrote"))
    spec["root"]["readonly"] = False
    w = runtime.run_to_exit(spec)
    assert w.wait() == 0 and w.stdout == "wrote\n"
    assert (w.bundle / "rootfs" / "x").exists()


def test_masked_and_readonly_paths(runtime):
    c = runtime.run_to_exit(runtime.spec(sh(
        "wc -c < /proc/keys; ls -A /sys/firmware | wc -l; echo 1 > /proc/sys/kernel/ns_last_pid && echo wrote")))
    assert c.stdout.splitlines() == ["0", "0"]
    assert "Read-only file system" in c.stderr


def test_seccomp_blocks_denied_syscall(runtime):
    spec = runtime.spec(sh("mkdir /tmp/denied; echo mkdir=$?; grep ^Seccomp: /proc/self/status; touch /tmp/ok && echo touched"))
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                     {"names": ["no_such_syscall_name"], "action": "SCMP_ACT_ERRNO"}],
    }
    c = runtime.run_to_exit(spec)
    assert c.wait() == 0, c.stderr
    assert "Operation not permitted" in c.stderr
    assert c.stdout.splitlines() == ["mkdir=1", "Seccomp:\t2", "touched"]


def test_seccomp_argument_rule(runtime):
    """kill(pid, SIGUSR1) refused by an argument condition, kill(pid, 0) still allowed."""
    spec = runtime.spec(sh('trap "" USR1; kill -0 $$; echo zero=$?; kill -USR1 $$; echo usr1=$?'))
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                      "args": [{"index": 1, "value": signal.SIGUSR1, "op": "SCMP_CMP_EQ"}]}],
    }
    c = runtime.run_to_exit(spec)
    assert c.stdout.split() == ["zero=0", "usr1=1"], c.stderr


def test_memory_limit_oom_kill(runtime):
    spec = runtime.spec(sh("x=$(head -c 50000000 /dev/zero | tr '\\0' a); echo survived"))
    spec["linux"]["resources"]["memory"] = {"limit": 16 * MiB, "swap": 16 * MiB}
    c = runtime.create(spec)
    memory = _cgroup_dir(runtime, c, "memory")
    assert int((memory / "memory.limit_in_bytes").read_text()) == 16 * MiB
    c.start()
    assert c.wait() == 128 + signal.SIGKILL
    assert "survived" not in c.stdout
    counters = dict(line.split() for line in (memory / "memory.oom_control").read_text().splitlines())
    assert int(counters["oom_kill"]) >= 1  # (the kernel may kill the pipe's other end too)


def test_busybox_true_under_6m(runtime):
    spec = runtime.spec(["busybox", "true"])
    spec["linux"]["resources"]["memory"] = {"limit": 6 * MiB, "swap": 6 * MiB}
    c = runtime.create(spec)
    memory = _cgroup_dir(runtime, c, "memory")
    c.start()
    assert c.wait() == 0, c.stderr
    assert "oom_kill 0" in (memory / "memory.oom_control").read_text()
    assert int((memory / "memory.max_usage_in_bytes").read_text()) <= 6 * MiB


def test_exec_under_6m(runtime):
    spec = runtime.spec(["sleep", "100"])
    spec["linux"]["resources"]["memory"] = {"limit": 6 * MiB, "swap": 6 * MiB}
    c = runtime.create(spec)
    c.start()
    r = c.exec(["sh", "-c", "echo in; exit 4"])
    assert (r.returncode, r.stdout) == (4, "in\n")
    assert "oom_kill 0" in (_cgroup_dir(runtime, c, "memory") / "memory.oom_control").read_text()
    runtime.check("kill", c.id, "KILL")
    c.wait()


def test_pids_limit(runtime):
    """Limit 5: sh, the subshell and 3 sleeps; the 4th sleep's fork fails."""
    spec = runtime.spec(sh("(for i in 1 2 3 4 5 6 7 8; do sleep 30 & done); read n < /sys/fs/cgroup/pids/pids.current; echo $n"))
    spec["linux"]["resources"]["pids"] = {"limit": 5}
    c = runtime.create(spec)
    events = _cgroup_dir(runtime, c, "pids") / "pids.events"
    c.start()
    c.wait()
    assert c.stdout.strip() == "4"
    assert "can't fork" in c.stderr
    assert int(events.read_text().split()[1]) >= 1


def test_cgroup_resources_and_update(runtime):
    spec = runtime.spec(["sleep", "100"])
    spec["linux"]["resources"].update({
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"},
        "pids": {"limit": 50},
        "memory": {"limit": 64 * MiB, "reservation": 32 * MiB},
    })
    c = runtime.create(spec)
    c.start()
    cpu = _cgroup_dir(runtime, c, "cpu")
    assert (cpu / "cpu.shares").read_text().strip() == "512"
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (_cgroup_dir(runtime, c, "cpuset") / "cpuset.cpus").read_text().strip() == "0"
    assert (_cgroup_dir(runtime, c, "pids") / "pids.max").read_text().strip() == "50"
    memory = _cgroup_dir(runtime, c, "memory")
    assert int((memory / "memory.soft_limit_in_bytes").read_text()) == 32 * MiB
    update = {"pids": {"limit": 80}, "memory": {"limit": 128 * MiB}, "cpu": {"shares": 256}}
    runtime.check("update", "--resources", "-", c.id, input=json.dumps(update).encode())
    assert (_cgroup_dir(runtime, c, "pids") / "pids.max").read_text().strip() == "80"
    assert int((memory / "memory.limit_in_bytes").read_text()) == 128 * MiB
    assert (cpu / "cpu.shares").read_text().strip() == "256"
    event = json.loads(runtime.check("events", "--stats", c.id).stdout)
    assert event["type"] == "stats" and event["id"] == c.id
    assert event["data"]["memory"]["usage"]["limit"] == 128 * MiB
    assert event["data"]["pids"]["current"] == 1 and event["data"]["pids"]["limit"] == 80
    assert event["data"]["cpu"]["usage"]["total"] > 0


def test_init_exit_kills_the_rest_and_caller_reaps(runtime):
    c = runtime.create(runtime.spec(sh("sleep 100 & echo $!; sleep 0.2; exit 0")))
    procs = _cgroup_dir(runtime, c, "pids") / "cgroup.procs"
    c.start()
    assert c.wait() == 0
    # The init was our child (we are its subreaper) and is reaped: no zombie left.
    assert not os.path.exists(f"/proc/{c.pid}")
    _wait_for(lambda: procs.read_text().strip() == "")


def test_exec_into_running_container(runtime):
    c = runtime.create(runtime.spec(["sleep", "100"]))
    c.start()
    r = c.exec(["sh", "-c", "hostname; cat /proc/1/cmdline; echo; grep memory /proc/self/cgroup;"
                " cat /proc/self/cgroup; echo ==; cat /proc/1/cgroup; exit 5"],
               env=["PATH=/bin", "E=1"])
    assert r.returncode == 5
    lines = r.stdout.splitlines()
    assert lines[0] == "box" and lines[1] == "sleep\x00100\x00"
    assert c.id in lines[2]
    # in every hierarchy the init is in (the built-in runtime joins v1 through `tasks`)
    mine, _, init = "\n".join(lines[3:]).partition("\n==\n")
    assert sorted(mine.splitlines()) == sorted(init.splitlines())
    assert len(mine.splitlines()) > 1
    d = c.exec(["sh", "-c", "exit 3"], detach=True)
    assert d.returncode == 0
    # A detached exec process is reparented to us (the subreaper) and reaped by us.
    status = os.waitpid(d.pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 3
    assert c.exec(["no-such-binary"]).returncode != 0
    runtime.check("kill", c.id, "KILL")
    c.wait()


def test_pause_freezes_and_resume_thaws(runtime):
    c = runtime.create(runtime.spec(sh("while :; do :; done")))
    c.start()
    time.sleep(0.1)
    runtime.check("pause", c.id)
    assert c.state()["status"] == "paused"
    before = _cpu_ticks(c.pid)
    time.sleep(0.3)
    assert _cpu_ticks(c.pid) == before
    assert runtime.run("exec", c.id, "true").returncode != 0 or runtime.name == "runc"
    runtime.check("resume", c.id)
    assert c.state()["status"] == "running"
    time.sleep(0.3)
    assert _cpu_ticks(c.pid) > before
    runtime.check("kill", c.id, "KILL")
    assert c.wait() == 128 + signal.SIGKILL


def test_kill_all_and_delete_paused(runtime):
    c = runtime.create(runtime.spec(sh("sleep 100 & sleep 100 & wait")))
    c.start()
    procs = _cgroup_dir(runtime, c, "pids") / "cgroup.procs"
    _wait_for(lambda: len(procs.read_text().split()) == 3)
    runtime.check("pause", c.id)
    runtime.check("delete", "--force", c.id)
    assert c.wait() == 128 + signal.SIGKILL


def test_oom_score_adj_raised(runtime):
    spec = runtime.spec(["cat", "/proc/self/oom_score_adj"])
    spec["process"]["oomScoreAdj"] = 500
    c = runtime.run_to_exit(spec)
    assert c.stdout.strip() == "500"


def test_oom_score_adj_lowering_is_clamped(builtin):
    """Without CAP_SYS_RESOURCE lowering fails; like containerd we keep the current value."""
    current = int(open("/proc/self/oom_score_adj").read())
    spec = builtin.spec(["cat", "/proc/self/oom_score_adj"])
    spec["process"]["oomScoreAdj"] = -999
    c = builtin.run_to_exit(spec)
    assert c.wait() == 0, c.stderr
    assert int(c.stdout) in (-999, current)


def test_sysctl_in_new_network_namespace(runtime):
    spec = runtime.spec(["cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/ping_group_range"])
    spec["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1", "net.ipv4.ping_group_range": "0 0"}
    c = runtime.run_to_exit(spec)
    assert c.stdout.split() == ["1", "0", "0"]


def test_join_namespaces_by_path(runtime):
    first = runtime.create(runtime.spec(["sleep", "100"]))
    first.start()
    spec = runtime.spec(sh("hostname; readlink /proc/self/ns/net"), hostname=None)
    spec.pop("hostname")
    spec["linux"]["namespaces"] = [
        {"type": "pid"}, {"type": "ipc"}, {"type": "mount"},
        {"type": "uts", "path": f"/proc/{first.pid}/ns/uts"},
        {"type": "network", "path": f"/proc/{first.pid}/ns/net"},
    ]
    second = runtime.run_to_exit(spec)
    assert second.wait() == 0, second.stderr
    assert second.stdout.splitlines() == ["box", os.readlink(f"/proc/{first.pid}/ns/net")]
    runtime.check("kill", first.id, "KILL")
    first.wait()


def test_cgroup_namespace(runtime):
    spec = runtime.spec(sh("cat /proc/self/cgroup | grep memory; ls /sys/fs/cgroup/memory/ | grep -c limit_in_bytes"))
    spec["linux"]["namespaces"].append({"type": "cgroup"})
    c = runtime.run_to_exit(spec)
    assert c.wait() == 0, c.stderr
    assert c.stdout.splitlines()[0].endswith(":memory:/")


def test_console_socket(runtime, tmp_path):
    import array
    import socket

    path = str(tmp_path / f"console-{runtime.name}.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    spec = runtime.spec(sh("tty; stty size; echo done"))
    spec["process"]["terminal"] = True
    spec["process"]["consoleSize"] = {"height": 30, "width": 100}
    c = runtime.create(spec, extra=("--console-socket", path))
    conn, _ = server.accept()
    fds = array.array("i")
    _msg, ancdata, _flags, _addr = conn.recvmsg(1024, socket.CMSG_LEN(fds.itemsize))
    fds.frombytes(ancdata[0][2][: fds.itemsize])
    master = fds[0]
    conn.close()
    server.close()
    c.start()
    out = b""
    while b"done" not in out:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert c.wait() == 0
    lines = out.decode().replace("\r", "").splitlines()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1] == "30 100"


def test_no_pivot(runtime):
    c = runtime.run_to_exit(runtime.spec(sh("hostname; ls /bin/busybox")), extra=("--no-pivot",))
    assert c.wait() == 0, c.stderr
    assert c.stdout.splitlines() == ["box", "/bin/busybox"]


def test_missing_executable_fails_create(runtime):
    runtime.create(runtime.spec(["/no/such/binary"]), expect_fail=True)


def test_shared_rootfs_between_containers(runtime, tmp_path):
    rootfs = make_rootfs(tmp_path / f"shared-{runtime.name}")
    a = runtime.run_to_exit(runtime.spec(["true"]), rootfs=rootfs)
    b = runtime.run_to_exit(runtime.spec(["true"]), rootfs=rootfs)
    assert a.wait() == b.wait() == 0


# helpers -------------------------------------------------------------------------------

def _cgroup_dir(runtime, c, controller: str):
    from pathlib import Path

    return Path("/sys/fs/cgroup", controller, runtime.cgroup_parent, c.id)


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_exec_with_terminal(runtime, tmp_path):
    import array
    import socket

    c = runtime.create(runtime.spec(["sleep", "100"]))
    c.start()
    path = str(tmp_path / f"exec-console-{runtime.name}.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    proc = dict(runtime.last_spec["process"], args=["sh", "-c", "tty; echo $$; exit 4"], terminal=True)
    pfile = tmp_path / f"p-{runtime.name}.json"
    pfile.write_text(json.dumps(proc))
    pid_file = tmp_path / f"p-{runtime.name}.pid"
    r = runtime.run("exec", "--process", str(pfile), "--detach", "--console-socket", path,
                    "--pid-file", str(pid_file), c.id)
    assert r.returncode == 0, r.stderr
    conn, _ = server.accept()
    fds = array.array("i")
    _msg, ancdata, _f, _a = conn.recvmsg(1024, socket.CMSG_LEN(fds.itemsize))
    fds.frombytes(ancdata[0][2][: fds.itemsize])
    conn.close()
    server.close()
    out = b""
    while True:
        try:
            chunk = os.read(fds[0], 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(fds[0])
    status = os.waitpid(int(pid_file.read_text()), 0)[1]
    assert os.waitstatus_to_exitcode(status) == 4
    lines = out.decode().replace("\r", "").split()
    assert lines[0].startswith("/dev/pts/") and lines[1] != "1"
    runtime.check("kill", c.id, "KILL")
    c.wait()


def test_run_command(runtime):
    """`run` = create + start + wait + delete, the runtime being its container's subreaper."""
    spec = runtime.spec(sh("echo ran; exit 9"))
    bundle = runtime.base / "run-bundle"
    bundle.mkdir()
    spec["root"]["path"] = str(make_rootfs(bundle / "rootfs"))
    spec["linux"]["cgroupsPath"] = f"/{runtime.cgroup_parent}/run-{runtime.name}"
    (bundle / "config.json").write_text(json.dumps(spec))
    with open(bundle / "out", "w+") as out:
        r = runtime.run("run", "--bundle", str(bundle), f"run-{runtime.name}", stdout=out, stderr=out)
        out.seek(0)
        assert out.read() == "ran\n"
    assert r.returncode == 9
    assert runtime.run("state", f"run-{runtime.name}").returncode != 0


def test_default_seccomp_profile(runtime):
    """The process holds CAP_SYS_ADMIN but the profile was made for a process without it:
    unshare is refused by the filter alone, while ordinary work goes on."""
    from runtimed.oci.seccomp import default_profile

    spec = runtime.spec(sh("ls / >/dev/null && echo ok; unshare -u true; echo unshare=$?; sleep 0 && echo slept"))
    admin = ["CAP_SYS_ADMIN", "CAP_KILL"]
    spec["process"]["capabilities"] = {k: admin for k in ("bounding", "effective", "permitted")}
    spec["linux"]["seccomp"] = default_profile(["CAP_KILL"])
    c = runtime.run_to_exit(spec)
    assert c.stdout.split() == ["ok", "unshare=1", "slept"], c.stderr
    assert "Operation not permitted" in c.stderr
    spec["linux"]["seccomp"] = default_profile(admin)
    allowed = runtime.run_to_exit(spec)
    assert allowed.stdout.split() == ["ok", "unshare=0", "slept"], allowed.stderr


def test_term_ends_a_created_container(runtime):
    c = runtime.create(runtime.spec(["sleep", "100"]))
    runtime.check("kill", c.id, "TERM")
    # Ours exits 128+15; runc's Go init dies with Go's status 2 for an unhandled SIGTERM.
    assert c.wait() == (128 + signal.SIGTERM if runtime.name == "builtin" else 2)
    assert c.state()["status"] == "stopped"


def test_setup_failure_reports_and_cleans_up(runtime):
    spec = runtime.spec(["true"])
    spec["mounts"].append({"destination": "/mnt", "type": "bind", "source": "/no/such/source", "options": ["rbind"]})
    c = runtime.create(spec, expect_fail=True)
    assert "/no/such/source" in c.stderr
    assert runtime.run("state", c.id).returncode != 0


@pytest.mark.parametrize("propagation", ["rshared", None])
def test_mount_propagation_to_host(runtime, tmp_path, propagation):
    """rootfsPropagation rshared + an rshared bind: a mount made in the container shows up
    on the host; with the default (private) it does not."""
    import subprocess

    src = tmp_path / f"shared-{runtime.name}"
    (src / "sub").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(src), str(src)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(src)], check=True)
        spec = runtime.spec(sh("mount -t tmpfs -o size=1m none /shared/sub && echo mounted"))
        spec["mounts"].append({"destination": "/shared", "type": "bind", "source": str(src),
                               "options": ["rbind", "rshared"] if propagation else ["rbind"]})
        if propagation:
            spec["linux"]["rootfsPropagation"] = propagation
        admin = ["CAP_SYS_ADMIN"]
        spec["process"]["capabilities"] = {k: admin for k in ("bounding", "effective", "permitted")}
        c = runtime.run_to_exit(spec)
        assert c.stdout == "mounted\n", c.stderr
        with open("/proc/self/mountinfo") as f:
            on_host = any(line.split()[4] == str(src / "sub") for line in f)
        assert on_host == bool(propagation)
    finally:
        subprocess.run(["umount", "-R", "-l", str(src)], check=False)


@pytest.mark.parametrize("propagation", ["rslave", "rprivate", "private", "rshared"])
def test_rootfs_under_a_shared_mount(runtime, tmp_path, propagation):
    """pivot_root refuses a new root whose parent mount is shared: the rootfs lies under a
    shared mount, and every rootfsPropagation still gets its container (the recursive ones
    but rshared leave nothing shared; the others make that parent mount private)."""
    import subprocess

    shared = tmp_path / f"shared-root-{runtime.name}"
    shared.mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        spec = runtime.spec(sh("echo in"))
        spec["linux"]["rootfsPropagation"] = propagation
        c = runtime.run_to_exit(spec, rootfs=make_rootfs(shared / "rootfs"))
        assert (c.wait(), c.stdout) == (0, "in\n"), c.stderr
    finally:
        subprocess.run(["umount", "-R", "-l", str(shared)], check=False)


def test_a_device_node_in_the_image_is_replaced(builtin, tmp_path):
    """Without a tmpfs on /dev the default devices are made in the image's own /dev,
    replacing what the image has at their paths (runc prints nothing here: not compared)."""
    runtime = builtin
    rootfs = make_rootfs(tmp_path / "rootfs")
    (rootfs / "dev" / "null").write_text("not a device")
    spec = runtime.spec(sh("stat -c '%n %F %t:%T' /dev/null /dev/zero"))
    spec["mounts"] = [m for m in spec["mounts"] if not m["destination"].startswith("/dev")]
    spec["root"]["readonly"] = False
    c = runtime.run_to_exit(spec, rootfs=rootfs)
    assert c.wait() == 0, c.stderr
    assert c.stdout.splitlines() == ["/dev/null character special file 1:3",
                                     "/dev/zero character special file 1:5"]


def test_hooks(runtime, tmp_path):
    """Every hook kind runs once, in order, with the state on stdin (pid = the init's host pid)."""
    out = tmp_path / f"hooks-{runtime.name}"
    out.mkdir()

    def hook(kind: str, inside: bool = False) -> dict:
        target = f"/hooks/{kind}.json" if inside else str(out / f"{kind}.json")
        return {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {target}; date +%s%N >> {target}"]}

    spec = runtime.spec(["true"])
    spec["mounts"].append({"destination": "/hooks", "type": "bind", "source": str(out), "options": ["rbind"]})
    spec["hooks"] = {"prestart": [hook("prestart")], "createRuntime": [hook("createRuntime")],
                     "createContainer": [hook("createContainer")],
                     "startContainer": [hook("startContainer", inside=True)],
                     "poststart": [hook("poststart")], "poststop": [hook("poststop")]}
    spec["annotations"] = {"org.example/x": "y"}
    c = runtime.create(spec)
    created = {p.stem for p in out.iterdir()}
    # runc 1.1 runs poststart hooks at the end of `create`; the spec (and ours) at `start`.
    assert created - {"poststart"} == {"prestart", "createRuntime", "createContainer"}
    assert "poststart" not in created or runtime.name == "runc"
    c.start()
    assert c.wait() == 0
    runtime.check("delete", c.id)
    states = {}
    for p in out.iterdir():
        text, _stamp = p.read_text().rsplit("}", 1)
        states[p.stem] = json.loads(text + "}")
    assert set(states) == {"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"}
    for kind in ("prestart", "createRuntime", "createContainer", "startContainer", "poststart"):
        assert states[kind]["id"] == c.id and states[kind]["bundle"] == str(c.bundle), kind
        assert states[kind]["annotations"] == {"org.example/x": "y"}
    for kind in ("prestart", "createRuntime", "poststart"):
        assert states[kind]["pid"] == c.pid, kind
    assert states["createContainer"]["pid"] == 1  # seen from the container's pid namespace
    assert states["poststop"]["status"] == "stopped"


def test_failing_create_hook_fails_create(runtime, tmp_path):
    spec = runtime.spec(["true"])
    spec["hooks"] = {"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}]}
    runtime.create(spec, expect_fail=True)


def test_user_namespace(runtime):
    """Root in the container is uid 100000 on the host; host-owned files look unmapped."""
    spec = runtime.spec(sh("cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c %u /bin/busybox;"
                           " head -c 3 /dev/zero | wc -c; hostname; echo $$; sleep 2"))
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    # pytest's tmp dirs are 0700: the mapped root must be able to reach the rootfs.
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="runtimed-userns-", dir="/tmp"))
    try:
        base.chmod(0o755)
        c = runtime.create(spec, rootfs=make_rootfs(base / "rootfs"))
        _check_user_namespace(c)
    finally:
        shutil.rmtree(base)


def _check_user_namespace(c) -> None:
    c.start()
    def host_uid() -> int:
        return int(open(f"/proc/{c.pid}/status").read().split("Uid:")[1].split()[0])

    _wait_for(lambda: host_uid() != 0)
    assert host_uid() == 100000
    r = c.exec(["sh", "-c", "id -u; cat /proc/self/uid_map"])
    assert r.returncode == 0 and " ".join(r.stdout.split()) == "0 0 100000 65536", r.stdout
    assert c.wait() == 0, c.stderr
    lines = [" ".join(line.split()) for line in c.stdout.splitlines()]
    assert lines == ["0 100000 65536", "0 100000 65536", "0", "65534", "3", "box", "1"]


def test_preserve_fds(runtime, tmp_path):
    """--preserve-fds 1: fd 3 of the caller reaches the container process; fd 4 does not."""
    import fcntl
    import subprocess

    r, w = os.pipe()
    other_r, other_w = os.pipe()
    high_w, high_other = fcntl.fcntl(w, fcntl.F_DUPFD, 20), fcntl.fcntl(other_w, fcntl.F_DUPFD, 20)
    os.close(w)
    os.close(other_w)
    spec = runtime.spec(sh("echo through-fd3 >&3; for n in 3 4; do [ -e /proc/$$/fd/$n ] && echo has$n; done; true"))
    bundle = runtime.base / "pfds"
    bundle.mkdir()
    spec["root"]["path"] = str(make_rootfs(bundle / "rootfs"))
    spec["linux"]["cgroupsPath"] = f"/{runtime.cgroup_parent}/pfds-{runtime.name}"
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"pfds-{runtime.name}"
    argv = [*runtime.argv, "create", "--preserve-fds", "1", "--bundle", str(bundle),
            "--pid-file", str(bundle / "pid"), cid]
    # The caller's fds 3 and 4 are what the runtime sees; only 3 is to be preserved.
    wrapper = f'exec "$@" 3>&{high_w} 4>&{high_other} {high_w}>&- {high_other}>&-'
    try:
        with open(bundle / "out", "w+") as out:
            p = subprocess.run(["bash", "-c", wrapper, "bash", *argv], stdout=out, stderr=out,
                               pass_fds=(high_w, high_other), cwd=str(REPO))
            os.close(high_w)
            os.close(high_other)
            assert p.returncode == 0, (bundle / "out").read_text()
            pid = int((bundle / "pid").read_text())
            runtime.check("start", cid)
            status = os.waitpid(pid, 0)[1]
            assert os.waitstatus_to_exitcode(status) == 0
            assert os.read(r, 100) == b"through-fd3\n"
            out.seek(0)
            assert out.read().split() == ["has3"]
    finally:
        runtime.run("delete", "--force", cid)
        os.close(r)
        os.close(other_r)


def test_environment_like_runc(builtin, runc):
    outs = []
    for rt in (builtin, runc):
        spec = rt.spec(sh("env | sort"))
        spec["process"]["env"] = ["PATH=/bin", "A=1", "EMPTY="]
        c = rt.run_to_exit(spec)
        outs.append(c.stdout)
    assert outs[0] == outs[1]
    assert "HOME=/\n" in outs[0] and "A=1\n" in outs[0]


def test_builtin_on_cgroup_v2_unified_tree(builtin, monkeypatch):
    """The v2 code paths of the runtime for real, on this hybrid host's unified tree (no
    controllers there, so no limits): join, device filter, freeze/thaw, ps, stats, delete."""
    monkeypatch.setenv("SHIMD_CGROUP2_ROOT", "/sys/fs/cgroup/unified")
    spec = builtin.spec(sh("cat /proc/self/cgroup | grep '^0::'; ls /sys/fs/cgroup/cgroup.procs;"
                           " head -c 1 /dev/kmsg; echo kmsg=$?; while :; do :; done"))
    spec["linux"]["devices"] = [{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 0o644}]
    c = builtin.create(spec)
    from pathlib import Path

    group = Path("/sys/fs/cgroup/unified", builtin.cgroup_parent, c.id)
    try:
        c.start()
        _wait_for(lambda: "kmsg=" in c.stdout)
        assert c.stdout.splitlines()[:3] == [f"0::/{builtin.cgroup_parent}/{c.id}", "/sys/fs/cgroup/cgroup.procs", "kmsg=1"]
        assert "Operation not permitted" in c.stderr
        assert json.loads(builtin.check("ps", "--format", "json", c.id).stdout) == [c.pid]
        builtin.check("pause", c.id)
        assert c.state()["status"] == "paused" and "frozen 1" in (group / "cgroup.events").read_text()
        ticks = _cpu_ticks(c.pid)
        time.sleep(0.2)
        assert _cpu_ticks(c.pid) == ticks
        builtin.check("resume", c.id)
        assert c.state()["status"] == "running"
        stats = json.loads(builtin.check("events", "--stats", c.id).stdout)["data"]
        assert stats["cpu"]["usage"]["total"] > 0
        builtin.check("delete", "--force", c.id)
        assert c.wait() == 128 + signal.SIGKILL
        assert not group.exists()
    finally:
        builtin.run("delete", "--force", c.id)  # while SHIMD_CGROUP2_ROOT is still set
        for d in (group, group.parent):
            try:
                d.rmdir()
            except OSError:
                pass


def test_builtin_cgroup_namespace_on_v2_unified_tree(builtin, monkeypatch):
    """With a new cgroup namespace on v2 the init joins before mounting, so the container
    sees its own cgroup as / and a cgroup2 mount of just its subtree."""
    monkeypatch.setenv("SHIMD_CGROUP2_ROOT", "/sys/fs/cgroup/unified")
    spec = builtin.spec(sh("grep '^0::' /proc/self/cgroup; grep ' /sys/fs/cgroup ' /proc/self/mounts | cut -d' ' -f3;"
                           " cat /sys/fs/cgroup/cgroup.procs"))
    spec["linux"]["namespaces"].append({"type": "cgroup"})
    c = builtin.create(spec)
    from pathlib import Path

    group = Path("/sys/fs/cgroup/unified", builtin.cgroup_parent, c.id)
    try:
        c.start()
        assert c.wait() == 0, c.stderr
        lines = c.stdout.splitlines()
        assert lines[:2] == ["0::/", "cgroup2"]
        assert lines[2:] == ["1"]  # sh exec'd its last command: pid 1 alone, as the namespace sees it
    finally:
        builtin.run("delete", "--force", c.id)
        for d in (group, group.parent):
            try:
                d.rmdir()
            except OSError:
                pass


def test_personality_linux32(builtin):
    """linux.personality, for the init and for exec (runc 1.1 ignores it: built-in only)."""
    spec = builtin.spec(sh("uname -m; exec sleep 100"))
    spec["linux"]["personality"] = {"domain": "LINUX32"}
    c = builtin.create(spec)
    c.start()
    _wait_for(lambda: c.stdout)
    assert c.stdout.strip() in ("i686", "armv8l")
    r = c.exec(["uname", "-m"])
    assert r.stdout.strip() == c.stdout.strip()
    builtin.check("kill", c.id, "KILL")
    c.wait()


def test_concurrent_lifecycles(runtime, tmp_path):
    """Eight containers created, started and deleted at once under one --root and one
    cgroup parent: no shared-state race in the runtime's bookkeeping."""
    from concurrent.futures import ThreadPoolExecutor

    rootfs = make_rootfs(tmp_path / f"shared-{runtime.name}")
    spec = runtime.spec(sh("echo $$"))
    with ThreadPoolExecutor(8) as pool:
        containers = list(pool.map(lambda _: runtime.create(spec, rootfs=rootfs), range(8)))
        list(pool.map(lambda c: c.start(), containers))
    for c in containers:
        assert c.wait() == 0 and c.stdout == "1\n", c.stderr
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: runtime.run("delete", c.id), containers))
    assert [r.returncode for r in results] == [0] * 8


def test_bad_seccomp_profile_fails_create(builtin):
    spec = builtin.spec(["true"])
    spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW",
                                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_SOMETIMES"}]}
    c = builtin.create(spec, expect_fail=True)
    assert "SCMP_ACT_SOMETIMES" in c.stderr


def _mkdir_denied(errno_ret: int = 1) -> dict:
    return {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                          "errnoRet": errno_ret}]}


def test_seccomp_program_cache(builtin, tmp_path, monkeypatch):
    """Compiled once per profile (docs/oci-runtime.md), and the cached program is the one
    the init installs; a cache directory others could write to is not trusted."""
    from shimd.oci import seccomp

    cache = tmp_path / "cache"
    monkeypatch.setenv("SHIMD_OCI_SECCOMP_CACHE", str(cache))

    def mkdir_result(profile: dict) -> str:
        spec = builtin.spec(sh("mkdir /tmp/d 2>/dev/null; echo $?"))
        spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
        spec["linux"]["seccomp"] = profile
        c = builtin.run_to_exit(spec)
        assert c.wait() == 0, c.stderr
        return c.stdout.strip()

    assert mkdir_result(_mkdir_denied()) == "1"  # compiled and cached
    [entry] = list(cache.iterdir())
    assert entry.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    assert entry.stat().st_size % 8 == 0
    assert mkdir_result(_mkdir_denied()) == "1"  # from the cache, still enforced
    assert list(cache.iterdir()) == [entry]

    # the init installs what the cache holds: an allow-all program lets mkdir through
    fd = os.memfd_create("allow")
    seccomp.precompile_into(fd, {"defaultAction": "SCMP_ACT_ALLOW"})
    entry.write_bytes(os.pread(fd, os.fstat(fd).st_size, 0))
    os.close(fd)
    assert mkdir_result(_mkdir_denied()) == "0"

    cache.chmod(0o770)  # writable by the group: ignored, the profile is compiled again
    assert mkdir_result(_mkdir_denied()) == "1"
    cache.chmod(0o700)
    assert mkdir_result(_mkdir_denied(13)) == "1"  # another profile, another entry
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("bad", [
    {"rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]},
    {"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]},
    {"cwd": "relative"},
])
def test_bad_process_fails_create(runtime, bad):
    spec = runtime.spec(["true"])
    spec["process"].update(bad)
    runtime.create(spec, expect_fail=True)


def test_state_and_list_json_like_runc(builtin, runc):
    shapes = []
    for rt in (builtin, runc):
        spec = rt.spec(["sleep", "100"])
        spec["annotations"] = {"a": "b"}
        c = rt.create(spec)
        created = c.state()
        listed = json.loads(rt.check("list", "--format", "json").stdout)
        assert [entry["id"] for entry in listed] == [c.id] and listed[0]["status"] == "created"
        c.start()
        running = c.state()
        rt.check("kill", c.id, "KILL")
        c.wait()
        stopped = c.state()
        assert (created["status"], running["status"], stopped["status"]) == ("created", "running", "stopped")
        assert created["pid"] == running["pid"] == c.pid and stopped["pid"] == 0
        assert created["annotations"] == {"a": "b"} and created["bundle"] == str(c.bundle)
        shapes.append((sorted(created), sorted(listed[0])))
    assert shapes[0] == shapes[1]


def _ignored_by_this_process() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))


def test_no_signal_is_ignored_or_blocked_in_the_container(runtime):
    """Python ignores SIGPIPE and SIGXFSZ; the container's processes (init and exec'd) must
    not inherit that: `yes | head -1` has to end `yes` with SIGPIPE, as under runc."""
    c = runtime.create(runtime.spec(sh("grep -E '^Sig(Ign|Blk)' /proc/self/status; sleep 100")))
    c.start()
    _wait_for(lambda: "SigBlk" in c.stdout)
    r = c.exec(sh("grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -1 >/dev/null;"
                  " echo ${PIPESTATUS:-done}"))
    assert r.returncode == 0, r.stdout
    # what the container may ignore: what this test process inherited ignored (a caller's
    # ignores pass through execve, under runc too), not the two Python ignores itself
    inherited = _ignored_by_this_process() & ~(1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    expected = ["SigBlk:\t0000000000000000", f"SigIgn:\t{inherited:016x}"]
    assert c.stdout.splitlines()[:2] == expected
    assert r.stdout.splitlines()[:2] == expected
    assert "Broken pipe" not in r.stdout
    runtime.check("kill", c.id, "KILL")
    c.wait()


def test_the_state_is_saved_while_the_init_sets_up(builtin, tmp_path):
    """begin_create saves the state once it has forked the init, before the caller waits
    for the init's report: a caller (the shim) that dies during the init's setup leaves
    what `delete --force` (runtimed's cleanup after a dead shim) needs to kill the init
    and remove its cgroup."""
    from shimd.oci import commands
    from shimd.oci.state import Store

    bundle = tmp_path / "early"
    bundle.mkdir()
    spec = builtin.spec(["true"])
    spec["root"]["path"] = str(make_rootfs(bundle / "rootfs"))
    spec["linux"]["cgroupsPath"] = f"/{builtin.cgroup_parent}/early"
    (bundle / "config.json").write_text(json.dumps(spec))
    store = Store(str(tmp_path / "state"))
    null = os.open(os.devnull, os.O_RDWR)
    try:
        creation = commands.begin_create(store, "early", str(bundle), stdio=(null, null, null),
                                         pid_file=str(tmp_path / "init.pid"))
    finally:
        os.close(null)
    try:
        state = store.load("early")  # before the report is read
        assert state.pid == creation.pid and state.start_time
        assert (tmp_path / "init.pid").read_text() == str(creation.pid)  # the shim's, likewise
        cgroup = commands._cgroup(state)
        assert cgroup.exists()
        # the caller is gone, nobody reads the report; the sync pipe stays open (a closed
        # one would end the init by itself: its "ready" fails), so only the delete ends it
        commands.delete(store, "early", force=True)
        for _ in range(200):
            reaped, status = os.waitpid(creation.pid, os.WNOHANG)
            if reaped:
                break
            time.sleep(0.05)
        else:  # never ended by the delete: ended here (not waited for forever)
            os.kill(creation.pid, signal.SIGKILL)
            os.waitpid(creation.pid, 0)
            pytest.fail("delete --force left the init running")
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    finally:
        creation.close()
    assert not cgroup.exists() and store.ids() == []


def test_with_a_user_namespace_the_state_is_saved_on_the_pid_line(builtin):
    """With a new user namespace an intermediate child forks the init and reports its host
    pid ("pid N"): the state is saved then, while the init sets up, so a caller that dies
    before the init's report leaves what `delete --force` needs here too."""
    import shutil
    import tempfile

    from shimd.oci import commands
    from shimd.oci.state import Store

    base = Path(tempfile.mkdtemp(prefix="runtimed-userns-", dir="/tmp"))
    try:
        base.chmod(0o755)  # the mapped root must reach the rootfs
        bundle = base / "early"
        bundle.mkdir()
        spec = builtin.spec(["true"])
        spec["root"]["path"] = str(make_rootfs(bundle / "rootfs"))
        spec["linux"]["cgroupsPath"] = f"/{builtin.cgroup_parent}/early-userns"
        spec["linux"]["namespaces"].append({"type": "user"})
        spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        (bundle / "config.json").write_text(json.dumps(spec))
        store = Store(str(base / "state"))
        null = os.open(os.devnull, os.O_RDWR)
        try:
            creation = commands.begin_create(store, "early", str(bundle),
                                             stdio=(null, null, null))
        finally:
            os.close(null)
        try:
            assert creation.pid == 0 and creation.intermediate  # the init's pid comes later
            report = commands.SyncReport(0, creation.on_hooks, creation.on_userns,
                                         creation.on_pid)
            while not report.pid and not report.feed(os.read(creation.sync, 4096)):
                pass
            state = store.load("early")  # saved on the "pid" line: nobody finished the create
            assert state.pid == report.pid > 0 and state.start_time
            cgroup = commands._cgroup(state)
            # the caller is gone; the sync pipe stays open, so only the delete ends the init
            commands.delete(store, "early", force=True)
            for _ in range(200):
                if not _alive(state.pid):
                    break
                time.sleep(0.05)
            assert not _alive(state.pid)
        finally:
            creation.close()
            os.waitpid(creation.intermediate, 0)
        assert not cgroup.exists() and store.ids() == []
    finally:
        shutil.rmtree(base)


def _alive(pid: int) -> bool:
    try:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # ours to reap when this process is a subreaper
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
