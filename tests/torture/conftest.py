"""Fixtures of the torture suite: one containerd namespace per test (its cgroups are
`/<controller>/<namespace>/<id>`, so the leak check is precise and never touches the
containers of tests running elsewhere), the busybox archive, a daemon shared by a module,
and the summary line `make soak` ends with."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests import testimages
from tests.conftest import DaemonProcess, mounts_under, processes_mentioning, unmount_all
from tests.torture import stats

CGROUP_ROOT = Path("/sys/fs/cgroup")
NS_PREFIX = "trt-"


def pytest_terminal_summary(terminalreporter):
    if any(stats.COUNTS.values()):
        terminalreporter.write_sep("=", "torture suite")
        terminalreporter.write_line(stats.summary())


def namespace_cgroups(namespace: str) -> list[Path]:
    """The `<controller>/<namespace>` parents that exist (one per mounted hierarchy)."""
    found = []
    for controller in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []:
        path = controller / namespace
        if controller.is_dir() and not controller.is_symlink() and path.is_dir():
            found.append(path)
    return found


def remove_namespace_cgroups(namespace: str) -> list[str]:
    """Remove `<controller>/<namespace>` trees; the container cgroups found in them (leaks)."""
    leaked = []
    for parent in namespace_cgroups(namespace):
        for child in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            leaked.append(str(child))
            try:
                for pid in (child / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
            _rmdir(child)
        _rmdir(parent)
    return leaked


def _rmdir(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


@pytest.fixture
def ns() -> str:
    """A containerd namespace of this test alone."""
    return NS_PREFIX + uuid.uuid4().hex[:8]


@pytest.fixture
def leak_check():
    """Replaces the shared cgroup check: every `trt-` namespace the daemon held must have no
    container cgroup left; the empty namespace parents are removed afterwards."""
    namespaces: set[str] = set()
    yield namespaces.update
    leaked = []
    for name in namespaces:
        if name.startswith(NS_PREFIX):
            leaked += remove_namespace_cgroups(name)
    if leaked:
        stats.record("leaks", len(leaked))
    assert not leaked, f"cgroups left behind: {leaked}"


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict:
    return testimages.build(tmp_path_factory.mktemp("torture-images"))


@pytest.fixture(scope="session")
def busybox_archive(images) -> str:
    return str(images["busybox"].archive)


def stop_and_check(proc: DaemonProcess) -> list[str]:
    """Stop a daemon and remove its dirs; what it left behind (mounts, processes)."""
    proc.stop()
    problems = []
    mounts = mounts_under(proc.base)
    if mounts:
        problems.append(f"mounts left behind: {mounts}")
        unmount_all(mounts)
    stray = processes_mentioning(str(proc.base))
    if stray:
        problems.append(f"processes left behind: {stray}")
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(proc.base, ignore_errors=True)
    if problems:
        stats.record("leaks", len(problems))
    return problems


@pytest.fixture(scope="module")
def shared_daemon():
    """One runtimed for a whole module (the fuzzing tests make thousands of calls)."""
    proc = DaemonProcess(Path(tempfile.mkdtemp(prefix="rtt-", dir="/tmp")))
    proc.start()
    yield proc
    problems = stop_and_check(proc)
    assert not problems, "; ".join(problems)
