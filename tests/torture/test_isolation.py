"""Container isolation under the default spec the client library builds (`ctl.client`,
Docker's defaults: capabilities, masked and read-only paths, devices cgroup, rlimits,
Docker's seccomp profile), through the built-in runtime and runc. Each probe tries
something a container must not do and reports whether the kernel let it."""

from __future__ import annotations

import os
import platform
import shutil

import pytest

from ctl.client import Client, CreateOptions, SpecOptions
from runtimed.oci.spec import Mount
from tests import testimages
from tests.shim.conftest import BUILTIN
from tests.torture import stats

IMAGE = testimages.BUSYBOX_NAME
RUNTIMES = (["builtin"] if BUILTIN else []) + ["runc"]


def _disk() -> str:
    """major and minor of a real block device of this host (read-only probe target)."""
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith(("loop", "ram", "zram")):
            return open(f"/sys/block/{name}/dev").read().strip().replace(":", " ")
    return "7 0"


PROBES = r"""
probe() { name=$1; shift; if "$@" >/dev/null 2>/tmp/err; then echo "$name=allowed";
          else echo "$name=denied $(head -c 150 /tmp/err | tr '\n' ' ')"; fi; }
echo "pids=$(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
echo "fds=$(ls /proc/self/fd | tr '\n' ' ')"
echo "init=$(readlink /proc/1/exe)"
probe mount mount -t tmpfs none /mnt
probe remount mount -o remount,rw /sys
probe sysrq sh -c 'echo h > /proc/sysrq-trigger'
probe sys sh -c 'v=$(cat /sys/module/printk/parameters/time) && echo $v > /sys/module/printk/parameters/time'
probe procsys sh -c 'v=$(cat /proc/sys/kernel/domainname) && echo $v > /proc/sys/kernel/domainname'
probe disk sh -c 'mknod /tmp/disk b DISK && head -c 512 /tmp/disk'
probe insmod sh -c 'echo junk > /tmp/x.ko && busybox insmod /tmp/x.ko'
probe rlimit_soft sh -c 'ulimit -S -n 4096'
probe rlimit_hard sh -c 'ulimit -H -n 2048'
probe hostname hostname evil
probe exe_write sh -c ': >> /proc/1/exe'
probe kcore head -c 1 /proc/kcore
probe userns unshare -U true
probe mountns unshare -m true
echo "seccomp=$(grep Seccomp: /proc/self/status | tr -d '\t ')"
""".replace("DISK", _disk())

# every probe must be denied
DENIED = ["mount", "remount", "sysrq", "sys", "procsys", "disk", "insmod", "rlimit_soft",
          "rlimit_hard", "hostname", "exe_write", "kcore", "userns", "mountns"]


def run(daemon, ns: str, runtime: str, args: list[str], **spec) -> tuple[int, str]:
    options = CreateOptions(runtime_binary="" if runtime == "builtin" else runtime)
    with Client(daemon.address, namespace=ns) as client:
        with client.run(f"iso-{os.urandom(3).hex()}", IMAGE, SpecOptions(args=args, **spec),
                        options) as box:
            status = box.wait(timeout=60)
            return status.code, (box.output() + box.errors()).decode(errors="replace")


def parse(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


@pytest.fixture
def rd(daemon, ns, busybox_archive):
    daemon.ctr("images", "import", busybox_archive, namespace=ns)
    return daemon


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_default_spec_keeps_the_container_in(rd, ns, runtime):
    code, output = run(rd, ns, runtime, ["sh", "-c", PROBES])
    results = parse(output)
    stats.record("inputs", len(DENIED))
    assert code == 0, output
    pids = [int(p) for p in results["pids"].split()]
    assert pids and max(pids) < 100 and len(pids) < 8, results["pids"]  # its own pid ns
    assert os.getpid() not in pids or os.getpid() < 100
    fds = set(results["fds"].split())
    assert fds <= {"0", "1", "2", "3"}, f"host fds reached the container: {fds}"
    assert results["init"] == "/bin/busybox"
    allowed = {name: results.get(name, "missing") for name in DENIED
               if not results.get(name, "").startswith("denied")}
    assert not allowed, f"the container could: {allowed}\n{output}"
    assert results["seccomp"] == "Seccomp:2", results["seccomp"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_seccomp_is_what_blocks_user_namespaces(rd, ns, runtime):
    """The oracle: without the profile the same probe succeeds, so the refusal above is
    the profile's doing, not an accident of the environment."""
    code, output = run(rd, ns, runtime, ["sh", "-c", PROBES], seccomp_unconfined=True)
    results = parse(output)
    assert results["userns"] == "allowed", output
    assert results["seccomp"] == "Seccomp:0"


SYSCALLS = {  # number per architecture; all allowed to unprivileged processes by the kernel
    "x86_64": {"keyctl": 250, "add_key": 248, "request_key": 249},
    "aarch64": {"keyctl": 219, "add_key": 217, "request_key": 218},
}

SYSCALL_PROBE = r"""
import ctypes, errno, json, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for name, nr in json.loads(sys.argv[1]).items():
    args = {"keyctl": (0, -3, 0), "add_key": (b"user", b"trt", b"x", 1, -3),
            "request_key": (b"user", b"trt", None, 0)}[name]
    r = libc.syscall(nr, *args)
    out[name] = "denied" if r < 0 and ctypes.get_errno() == errno.EPERM else f"ran {r}"
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.machine() not in SYSCALLS or not shutil.which("python3"),
                    reason="syscall numbers known for x86_64 and aarch64 only")
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_seccomp_blocks_docker_blocked_syscalls(rd, ns, runtime):
    """keyctl, add_key and request_key need no capability, so only the seccomp
    profile stops them. The host's Python is bound in read-only to issue the raw calls."""
    import json

    numbers = SYSCALLS[platform.machine()]
    python = os.path.realpath("/usr/bin/python3")
    mounts = [Mount("/usr", "/usr", readonly=True), Mount("/lib", "/usr/lib", readonly=True),
              Mount("/lib64", "/usr/lib64", readonly=True)]
    args = [python, "-I", "-c", SYSCALL_PROBE, json.dumps(numbers)]
    code, output = run(rd, ns, runtime, args, mounts=mounts)
    assert code == 0, output
    confined = json.loads(output.strip().splitlines()[-1])
    stats.record("inputs", len(numbers))
    assert confined == {name: "denied" for name in numbers}, confined
    code, output = run(rd, ns, runtime, args, mounts=mounts, seccomp_unconfined=True)
    unconfined = json.loads(output.strip().splitlines()[-1])
    assert all(v != "denied" for v in unconfined.values()), unconfined


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_binaries_are_not_reachable_during_exec(rd, ns, runtime):
    """/proc/<pid>/exe of the runtime's helper processes (runc init, the built-in init)
    must never be reachable from inside (CVE-2019-5736: opened for writing), while execs
    come in: the helpers are not dumpable until they exec the container's binary."""
    watcher = r"""
    : > /tmp/seen; : > /tmp/hits
    while true; do
      for p in /proc/[0-9]*; do
        t=$(readlink $p/exe 2>/dev/null) || continue
        case "$t" in /bin/busybox) ;; *) echo "$p $t" >> /tmp/seen
          (: >> $p/exe) 2>/dev/null && echo "$p $t" >> /tmp/hits ;; esac
      done
    done
    """
    options = CreateOptions(runtime_binary="" if runtime == "builtin" else runtime)
    with Client(rd.address, namespace=ns) as client:
        with client.run("watch", IMAGE, SpecOptions(args=["sh", "-c", watcher]),
                        options) as box:
            for i in range(15):
                rd.ctr("tasks", "exec", "--exec-id", f"e{i}", "watch", "true", namespace=ns)
            out = rd.ctr("tasks", "exec", "--exec-id", "report", "watch", "sh", "-c",
                         "cat /tmp/hits; echo ---; cat /tmp/seen", namespace=ns).stdout
            rd.ctr("tasks", "kill", "-s", "SIGKILL", "watch", namespace=ns)
            box.wait(timeout=30)
    hits, seen = out.split("---", 1)
    stats.record("inputs", 15)
    assert hits.strip() == "", f"runtime binary writable from the container: {hits}"
    assert seen.strip() == "", f"runtime binary visible from the container: {seen}"
