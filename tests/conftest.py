"""Shared fixtures: a real runtimed on temporary dirs, and a leak check after every test.

`daemon` starts `python -m runtimed.daemon` on a fresh root, state dir and socket, and
stops it afterwards. Whatever a test leaves behind (mounts under those dirs, processes
started from them, new cgroups) fails the test and is then cleaned up, so one leak does
not cascade into the next test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# CI explores the same property-test examples on every run, so a red CI points at the
# change that made it; development runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
CGROUP_ROOT = Path("/sys/fs/cgroup")

# registry fixtures (a real docker-registry on loopback), shared by the registry tests
pytest_plugins = ["tests.registry_server"]


# the ctr subcommands that make FIFOs for the process's stdio (see ctr_command)
CTR_TAKES_FIFOS = (("run",), *((t, v) for t in ("tasks", "task", "t") for v in ("start", "exec")))


class DaemonProcess:
    """A runtimed process on its own root/state/socket (paths kept short for AF_UNIX)."""

    def __init__(self, base: Path, extra_args: list[str] | None = None):
        self.base = base
        self.root = base / "root"
        self.state = base / "state"
        self.address = str(base / "rd.sock")
        self.log = base / "runtimed.log"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "runtimed.daemon", "--root", str(self.root),
            "--state", str(self.state), "--address", self.address, "--log-level", "debug",
            *self.extra_args,
        ]

    def start(self, timeout: float = 20) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runtimed exited with {self.proc.returncode}:\n{self.log_text()}")
            if os.path.exists(self.address) and self._healthy():
                return
            time.sleep(0.05)
        self.proc.kill()  # never leave a half-started daemon behind
        self.proc.wait()
        raise RuntimeError(f"runtimed did not come up in {timeout}s:\n{self.log_text()}")

    def _healthy(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with self.channel() as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    def channel(self):
        import grpc

        return grpc.insecure_channel(
            f"unix://{self.address}",
            options=[("grpc.max_receive_message_length", 16 << 20)],
        )

    def ctr_command(self, *args: str, namespace: str | None = None) -> list[str]:
        """The command line of the real containerd `ctr` against this daemon. `ctr run`,
        `tasks start` and `tasks exec` make their FIFOs in /run/containerd/fifo/<random>
        and leave them there when they do not wait for the process (-d) or are killed:
        here they go under this daemon's directory, removed with it."""
        cmd = ["ctr", "-a", self.address] + (["-n", namespace] if namespace else [])
        sub = next((c for c in CTR_TAKES_FIFOS if args[:len(c)] == c), ())
        if sub:
            args = (*sub, "--fifo-dir", str(self.base / "fifo"), *args[len(sub):])
        return [*cmd, *args]

    def ctr(self, *args: str, check: bool = True, input: str | bytes | None = None,
            namespace: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the real containerd `ctr` against this daemon."""
        text = not isinstance(input, bytes)
        result = subprocess.run(
            self.ctr_command(*args, namespace=namespace), capture_output=True, input=input,
            text=text, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited {result.returncode}:\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                f"runtimed log:\n{self.log_text()[-3000:]}"
            )
        return result


# ---- leak checks ----------------------------------------------------------------------

def mounts_under(*paths: Path) -> list[str]:
    prefixes = tuple(str(p) for p in paths)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target.startswith(prefixes):
                found.append(target)
    return found


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def cgroup_dirs(depth: int = 4) -> set[str]:
    found = set()
    if not CGROUP_ROOT.is_dir():
        return found
    base_depth = len(CGROUP_ROOT.parts)
    for dirpath, dirnames, _ in os.walk(CGROUP_ROOT):
        level = len(Path(dirpath).parts) - base_depth
        if level >= depth:
            dirnames[:] = []
        found.add(dirpath)
    return found


def unmount_all(paths: list[str]) -> None:
    for target in sorted(paths, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def remove_cgroups(dirs: set[str]) -> None:
    """Remove the empty ones. Processes are left alone: when test runs overlap, a cgroup
    that looks leaked may be another run's live container."""
    for path in sorted(dirs, key=len, reverse=True):
        try:
            os.rmdir(path)
        except OSError:
            pass


def release_cgroup(cgroup: Path, timeout: float = 10) -> None:
    """Move what is in `cgroup` to its hierarchy's root (its parent) and remove it, retried
    for a while: a shim forked while a zygote was in it may still be exiting."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            try:
                (cgroup.parent / "cgroup.procs").write_text(pid)
            except ProcessLookupError:  # it ended meanwhile
                pass
        try:
            cgroup.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def daemon_namespaces(root: Path) -> set[str]:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{root / 'meta.db'}?mode=ro", uri=True) as conn:
            return {row[0] for row in conn.execute("SELECT name FROM namespaces")}
    except sqlite3.Error:
        return set()


def container_cgroups(new: set[str], namespaces: set[str]) -> set[str]:
    """New cgroups named as containerd clients name a container's (`<controller>/<namespace>/
    <id>`) in one of the daemon's namespaces. The empty `<controller>/<namespace>` parent
    stays by design, as with containerd; cgroups of tests running elsewhere are not ours."""
    found = set()
    for path in new:
        parts = Path(path).parts[len(CGROUP_ROOT.parts):]
        if len(parts) >= 3 and parts[1] in namespaces:
            found.add(path)
    return found


@pytest.fixture(scope="session", autouse=True)
def namespace_cgroups_removed():
    """The namespace-level cgroups (`<hierarchy>/<namespace>`) the session's containers
    made, removed when it ends: runtimed, as containerd, leaves a namespace's parent
    cgroup in place, which on a test machine is litter. Only empty ones go (a cgroup an
    overlapping run still uses stays)."""
    before = cgroup_dirs(depth=2)
    yield
    remove_cgroups(cgroup_dirs(depth=2) - before)


@pytest.fixture
def leak_check():
    """Yields a function the daemon fixture calls with its namespaces after stopping:
    container cgroups in them that are still there fail the test (and are removed)."""
    before = cgroup_dirs()
    namespaces: set[str] = set()
    yield namespaces.update
    leaked = container_cgroups(cgroup_dirs() - before, namespaces)
    remove_cgroups(leaked)
    assert not leaked, f"cgroups left behind: {sorted(leaked)}"


@pytest.fixture
def daemon(leak_check):
    base = Path(tempfile.mkdtemp(prefix="rtd-", dir="/tmp"))
    proc = DaemonProcess(base)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        if callable(leak_check):
            leak_check(daemon_namespaces(proc.root))
        problems = []
        mounts = mounts_under(base)
        if mounts:
            problems.append(f"mounts left behind: {mounts}")
            unmount_all(mounts)
        stray = processes_mentioning(str(base))
        if stray:
            problems.append(f"processes left behind: {stray}")
            for pid in stray:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(base, ignore_errors=True)
        assert not problems, "; ".join(problems)
