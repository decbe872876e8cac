"""Access: runtimed's socket is 0660 and root-owned (group configurable); a user without the
group is refused, one with it gets in; nobody but root reaches a shim's socket."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import testimages
from tests.conftest import DaemonProcess
from tests.torture import stats
from tests.torture.conftest import stop_and_check

GROUP = "adm"  # a group nobody is not in; given to the socket by the config file

CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n"
    "    s.connect(sys.argv[1])\n"
    "except OSError as e:\n"
    "    print(e.strerror); sys.exit(1)\n"
    "print('connected')\n"
)


def as_nobody(*args: str, groups: str | None = None) -> subprocess.CompletedProcess:
    ids = ["--reuid=nobody", "--regid=nogroup"]
    ids += [f"--groups={groups}"] if groups else ["--clear-groups"]
    stats.record("inputs")
    return subprocess.run(["setpriv", *ids, *args], capture_output=True, text=True, timeout=60)


def traversable(path: Path):
    """Let others traverse (not list) the dirs down to `path`, as /run/runtimed is (0711);
    the socket's own mode is then all that stands in the way."""
    changed = []
    for parent in [p for p in path.parents if str(p).startswith(tempfile.gettempdir() + "/")]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            changed.append((parent, mode))
            parent.chmod(stat.S_IMODE(mode) | 0o011)
    return changed


def restore(changed) -> None:
    for path, mode in changed:
        path.chmod(stat.S_IMODE(mode))


def test_socket_is_0660_root_and_refuses_others(daemon):
    st = os.stat(daemon.address)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)
    changed = traversable(Path(daemon.address))
    try:
        refused = as_nobody("ctr", "-a", daemon.address, "namespaces", "ls")
        assert refused.returncode != 0
        assert "permission denied" in refused.stderr.lower(), refused.stderr
        raw = as_nobody(sys.executable, "-c", CONNECT, daemon.address)
        assert raw.returncode == 1 and "Permission denied" in raw.stdout
    finally:
        restore(changed)
    assert daemon.ctr("namespaces", "ls").returncode == 0  # root still gets in


@pytest.fixture
def grouped_daemon(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="rtt-", dir="/tmp"))
    config = base / "runtimed.toml"
    config.write_text(f'socket_group = "{GROUP}"\n')
    proc = DaemonProcess(base, ["--config", str(config)])
    proc.start()
    yield proc
    problems = stop_and_check(proc)
    assert not problems, problems


def test_the_socket_group_lets_its_members_in(grouped_daemon):
    st = os.stat(grouped_daemon.address)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam(GROUP).gr_gid
    changed = traversable(Path(grouped_daemon.address))
    try:
        member = as_nobody("ctr", "-a", grouped_daemon.address, "namespaces", "ls",
                           groups=GROUP)
        assert member.returncode == 0, member.stderr
        outsider = as_nobody("ctr", "-a", grouped_daemon.address, "namespaces", "ls")
        assert outsider.returncode != 0
        assert "permission denied" in outsider.stderr.lower()
    finally:
        restore(changed)


def test_shim_sockets_are_root_only(daemon, ns, busybox_archive):
    daemon.ctr("images", "import", busybox_archive, namespace=ns)
    daemon.ctr("run", "-d", testimages.BUSYBOX_NAME, "held", "sleep", "100000", namespace=ns)
    try:
        sockets = [p for p in daemon.state.rglob("*") if p.is_socket()]
        shim_sockets = [p for p in sockets if (ns in p.parts)]
        assert shim_sockets, sorted(map(str, sockets))
        changed = traversable(daemon.state / "x")
        try:
            for path in sockets:
                if Path(path) == Path(daemon.address):
                    continue
                result = as_nobody(sys.executable, "-c", CONNECT, str(path))
                assert result.returncode == 1, f"nobody connected to {path}"
                assert result.stdout.strip() == "Permission denied", (path, result)
        finally:
            restore(changed)
    finally:
        daemon.ctr("tasks", "rm", "-f", "held", namespace=ns)
        daemon.ctr("containers", "rm", "held", namespace=ns)
