"""Fixtures for shim tests: busybox bundles in tmp dirs and a real shimd per bundle.

The rootfs is Debian's busybox-static with its applet links; config.json starts from
`runc spec` (non-terminal) and lives under a test-specific cgroup path.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest

from runtimed.api.shim.v1 import shim_pb2, shim_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = "/bin/busybox"

# Deeper than the shared leak check scans (tests/conftest.py, 4 levels): a concurrent test
# elsewhere must not take our running containers' cgroups for its own leaks and kill them.
CGROUP_PARENT = "/runtimed-test/shim/c"



def _ensure_cgroup_parent() -> None:
    """Create the parent once, before any test's leak check takes its snapshot; it stays
    (empty), as containerd's namespace parents do."""
    root = Path("/sys/fs/cgroup")
    for controller in root.iterdir() if root.is_dir() else []:
        if controller.is_dir() and not controller.is_symlink():
            try:
                (controller / CGROUP_PARENT.lstrip("/")).mkdir(parents=True, exist_ok=True)
            except OSError:
                pass


def _remove_cgroup_parent() -> None:
    """At the end of the run, the empty parents go too: nothing of ours stays on the host."""
    root = Path("/sys/fs/cgroup")
    parts = Path(CGROUP_PARENT.lstrip("/")).parts
    for controller in root.iterdir() if root.is_dir() else []:
        for depth in range(len(parts), 0, -1):
            try:
                (controller / Path(*parts[:depth])).rmdir()
            except OSError:
                break


_ensure_cgroup_parent()
atexit.register(_remove_cgroup_parent)

CREATED_CGROUPS: list[str] = []


def _existing(cgroup: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [c / cgroup.lstrip("/") for c in root.iterdir() if (c / cgroup.lstrip("/")).is_dir()]


@pytest.fixture
def cgroup_check():
    """Our own leak check: the cgroups of the containers this test made are gone after it.
    (Precise by path, so tests running elsewhere at the same time are never touched.)"""
    start = len(CREATED_CGROUPS)
    yield
    leaked = [p for cg in CREATED_CGROUPS[start:] for p in _existing(cg)]
    for path in leaked:
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)
            path.rmdir()
        except OSError:
            pass
    assert not leaked, f"cgroups left behind: {leaked}"

# The same tests through runc (the oracle) and the built-in runtime (`python -m shimd.oci`);
# RUNTIMED_TEST_BUILTIN=0 leaves the built-in one out.
BUILTIN = os.environ.get("RUNTIMED_TEST_BUILTIN", "1") != "0"
RUNTIMES = ["runc"] + ([""] if BUILTIN else [])


def make_rootfs(rootfs: Path) -> None:
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split()
    for applet in applets:
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")


def make_spec(args: list[str], terminal: bool = False, cgroup: str | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="spec-"))
    try:
        subprocess.run(["runc", "spec"], cwd=tmp, check=True)
        spec = json.loads((tmp / "config.json").read_text())
    finally:
        shutil.rmtree(tmp)
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["hostname"] = "shimtest"
    spec["linux"]["cgroupsPath"] = cgroup or f"{CGROUP_PARENT}/{uuid.uuid4().hex[:12]}"
    CREATED_CGROUPS.append(spec["linux"]["cgroupsPath"])
    return spec


class ShimProcess:
    """A launched shimd for one bundle, with a gRPC stub to it."""

    def __init__(self, id: str, bundle: Path):
        self.id = id
        self.bundle = bundle
        out = subprocess.run(
            [sys.executable, "-m", "shimd", "--id", id, "--namespace", "test",
             "--bundle", str(bundle)],
            capture_output=True, text=True, cwd=REPO, timeout=30,
        )
        assert out.returncode == 0, out.stderr + self.log()
        self.address = out.stdout.strip()
        self.pid = int((bundle / "shim.pid").read_text())
        self.channel = grpc.insecure_channel(self.address)
        self.stub = shim_pb2_grpc.ShimStub(self.channel)

    def worker(self) -> int:
        """The worker serving for the shim's keeper (`pid`, shimd/keeper.py); woken by a
        call when it had retired."""
        for _ in range(100):
            for child in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split():
                if _comm(int(child)).startswith("shimw-"):
                    return int(child)
            self.stub.Connect(shim_pb2.ConnectRequest(id=self.id), timeout=5)
            time.sleep(0.02)
        raise AssertionError(f"the shim {self.pid} has no worker")

    def log(self) -> str:
        try:
            return (self.bundle / "shim.log").read_text()
        except FileNotFoundError:
            return ""

    def events(self, after: int = 0, count: int = 1, timeout: float = 10) -> list:
        stream = self.stub.Events(shim_pb2.EventsRequest(after=after), timeout=timeout)
        got = []
        try:
            for event in stream:
                got.append(event)
                if len(got) >= count:
                    break
        finally:
            stream.cancel()
        return got

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{self.pid}").exists() and "Z" not in _proc_state(self.pid)

    def stop(self) -> None:
        """Tear down whatever the test left: force-delete the task, shut the shim down."""
        try:
            self.stub.Delete(shim_pb2.DeleteRequest(id=self.id, force=True), timeout=15)
        except grpc.RpcError:
            pass
        try:
            self.stub.Shutdown(shim_pb2.ShutdownRequest(id=self.id, now=True), timeout=5)
        except grpc.RpcError:
            pass
        self.channel.close()
        for _ in range(100):
            if not self.alive():
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@pytest.fixture
def workdir():
    base = Path(tempfile.mkdtemp(prefix="shimt-", dir="/tmp"))
    yield base
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        target = line.split()[4]
        if target.startswith(str(base)):
            subprocess.run(["umount", "-l", target], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def rootfs_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("rootfs-template") / "rootfs"
    make_rootfs(path)
    return path


@pytest.fixture
def shims(workdir, rootfs_template, cgroup_check):
    """Factory: shims(args, ...) -> ShimProcess with a fresh bundle; all stopped after."""
    started: list[ShimProcess] = []

    def start(args: list[str], id: str | None = None, terminal: bool = False,
              spec_edit=None) -> ShimProcess:
        id = id or f"c{len(started)}"
        bundle = workdir / id
        bundle.mkdir()
        shutil.copytree(rootfs_template, bundle / "rootfs", symlinks=True)
        spec = make_spec(args, terminal)
        if spec_edit:
            spec_edit(spec)
        (bundle / "config.json").write_text(json.dumps(spec))
        shim = ShimProcess(id, bundle)
        started.append(shim)
        return shim

    yield start
    for shim in started:
        shim.stop()
