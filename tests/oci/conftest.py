"""Bundles from Debian's busybox-static and runc's default spec, run through the built-in
runtime and runc with the same command line, the way a shim drives them.

The test process makes itself child subreaper (as the shim does), so every container init
and detached exec process ends up as its child: it waits for them and reaps them. Each
runtime gets its own --root; container cgroups live under a test-specific parent
(`runtimed-test-<hex>`) that is removed, and checked empty, after the test.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
PR_SET_CHILD_SUBREAPER = 36
RUNTIMES = ["builtin", "runc"]
_libc = ctypes.CDLL(None, use_errno=True)
_SPEC: dict | None = None


def runc_default_spec() -> dict:
    """`runc spec` output, the same starting point for both runtimes."""
    global _SPEC
    if _SPEC is None:
        tmp = Path(f"/tmp/runc-spec-{os.getpid()}")
        tmp.mkdir(exist_ok=True)
        try:
            subprocess.run(["runc", "spec"], cwd=tmp, check=True)
            _SPEC = json.loads((tmp / "config.json").read_text())
        finally:
            shutil.rmtree(tmp)
    return copy.deepcopy(_SPEC)


def make_rootfs(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", path / "bin" / applet)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (path / d).mkdir(exist_ok=True)
    (path / "tmp").chmod(0o1777)
    return path


@dataclass
class Container:
    runtime: Runtime
    id: str
    bundle: Path
    pid: int = 0
    status: int | None = None  # raw wait status once reaped
    stdout_path: Path | None = None
    stderr_path: Path | None = None

    def start(self) -> None:
        self.runtime.check("start", self.id)

    def wait(self, timeout: float = 30) -> int:
        """Reap the init (we are its subreaper); the exit code, or 128+signal."""
        if self.status is None:
            self.status = wait_pid(self.pid, timeout)
        return exit_code(self.status)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def state(self) -> dict:
        return json.loads(self.runtime.check("state", self.id).stdout)

    def exec(self, args: list[str], detach: bool = False, **process) -> subprocess.CompletedProcess:
        proc = copy.deepcopy(self.runtime.last_spec["process"])
        proc.update(args=args, terminal=False, **process)
        pfile = self.bundle / f"exec-{uuid.uuid4().hex[:6]}.json"
        pfile.write_text(json.dumps(proc))
        pid_file = self.bundle / f"{pfile.stem}.pid"
        cmd = ["exec", "--process", str(pfile), "--pid-file", str(pid_file)]
        if detach:
            cmd.append("--detach")
        out = self.bundle / f"{pfile.stem}.out"
        with open(out, "w+") as f:
            r = self.runtime.run(*cmd, self.id, stdout=f, stderr=f)
            f.seek(0)
            r.stdout = f.read()
        if detach and r.returncode == 0:
            r.pid = int(pid_file.read_text())
        return r


class Runtime:
    """One OCI runtime (ours or runc) with its own state root, driven through its CLI."""

    def __init__(self, name: str, base: Path, cgroup_parent: str):
        self.name = name
        self.base = base
        self.cgroup_parent = cgroup_parent
        self.root = base / f"{name}-state"
        self.containers: list[Container] = []
        self.last_spec: dict = {}
        if name == "builtin":
            self.argv = [sys.executable, "-m", "shimd.oci", "--root", str(self.root)]
        else:
            self.argv = ["runc", "--root", str(self.root)]

    def run(self, *args: str, stdout=None, stderr=None, input: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        capture = stdout is None
        r = subprocess.run([*self.argv, *args], cwd=REPO, input=input, timeout=timeout,
                           stdout=subprocess.PIPE if capture else stdout,
                           stderr=subprocess.PIPE if capture else stderr)
        if capture:
            r.stdout = r.stdout.decode(errors="replace")
            r.stderr = r.stderr.decode(errors="replace")
        return r

    def check(self, *args: str, **kw) -> subprocess.CompletedProcess:
        r = self.run(*args, **kw)
        assert r.returncode == 0, f"{self.name} {' '.join(args)} exited {r.returncode}: {r.stderr}"
        return r

    def spec(self, args: list[str], **changes) -> dict:
        spec = runc_default_spec()
        spec["process"]["terminal"] = False
        spec["process"]["args"] = args
        spec["hostname"] = "box"
        for key, value in changes.items():
            spec[key] = value
        return spec

    def create(self, spec: dict, *, rootfs: Path | None = None, extra: tuple[str, ...] = (),
               expect_fail: bool = False) -> Container:
        n = len(self.containers)
        cid = f"{self.name}-{n}-{uuid.uuid4().hex[:6]}"
        bundle = self.base / cid
        bundle.mkdir()
        spec = copy.deepcopy(spec)
        spec["root"]["path"] = str(rootfs or make_rootfs(bundle / "rootfs"))
        spec.setdefault("linux", {})["cgroupsPath"] = f"/{self.cgroup_parent}/{cid}"
        (bundle / "config.json").write_text(json.dumps(spec))
        self.last_spec = spec
        c = Container(self, cid, bundle, stdout_path=bundle / "stdout", stderr_path=bundle / "stderr")
        with open(c.stdout_path, "w") as out, open(c.stderr_path, "w") as err, open(os.devnull) as null:
            r = subprocess.run([*self.argv, "create", "--bundle", str(bundle), "--pid-file",
                                str(bundle / "pid"), *extra, cid],
                               cwd=REPO, stdin=null, stdout=out, stderr=err, timeout=60)
        self.containers.append(c)
        if expect_fail:
            assert r.returncode != 0, f"{self.name} create unexpectedly succeeded"
            c.status = 0
            return c
        assert r.returncode == 0, f"{self.name} create failed: {c.stderr}"
        c.pid = int((bundle / "pid").read_text())
        return c

    def run_to_exit(self, spec: dict, **kw) -> Container:
        c = self.create(spec, **kw)
        c.start()
        c.wait()
        return c

    def cleanup(self) -> None:
        for c in self.containers:
            self.run("delete", "--force", c.id)
            if c.pid and c.status is None:
                try:
                    c.status = wait_pid(c.pid, 10)
                except (ChildProcessError, TimeoutError):
                    pass


def in_child(check) -> None:
    """Run `check()` in a forked child (namespaces, fds or libc state it changes stay
    there) and fail the test with what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            check()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the test
            os.write(w, repr(e).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        error = f.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, error


def wait_pid(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} did not exit in {timeout}s")
        time.sleep(0.005)


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def cgroup_dirs_named(name: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{name}") if p.is_dir()]


@pytest.fixture
def cgroup_parent():
    """A test-specific parent cgroup; it must be empty of containers when the test ends."""
    name = f"runtimed-test-{uuid.uuid4().hex[:10]}"
    yield name
    leftovers = []
    for d in cgroup_dirs_named(name):
        for child in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            leftovers.append(str(child))
            try:
                for pid in (child / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
            for _ in range(100):
                try:
                    child.rmdir()
                    break
                except OSError:
                    time.sleep(0.01)
        d.rmdir()
    assert not leftovers, f"container cgroups left behind: {leftovers}"


@pytest.fixture
def subreaper():
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _runtime(name: str, tmp_path: Path, cgroup_parent: str):
    base = tmp_path / name
    base.mkdir()
    rt = Runtime(name, base, cgroup_parent)
    try:
        yield rt
    finally:
        rt.cleanup()
        left = list(rt.root.glob("*")) if rt.root.exists() else []
        assert not left, f"{name} state left behind: {left}"
        with open("/proc/self/mountinfo") as f:
            leaked = [line.split()[4] for line in f if str(tmp_path) in line.split()[4]]
        assert not leaked, f"mounts left behind: {leaked}"


@pytest.fixture(params=RUNTIMES)
def runtime(request, tmp_path, cgroup_parent, subreaper):
    yield from _runtime(request.param, tmp_path, cgroup_parent)


@pytest.fixture
def builtin(tmp_path, cgroup_parent, subreaper):
    yield from _runtime("builtin", tmp_path, cgroup_parent)


@pytest.fixture
def runc(tmp_path, cgroup_parent, subreaper):
    yield from _runtime("runc", tmp_path, cgroup_parent)
