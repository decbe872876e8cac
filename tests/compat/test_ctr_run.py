"""`ctr run` and `ctr tasks ...` (the real containerd client) against a real runtimed with
the busybox test image: output, exit codes, detached tasks, exec, pause/resume, metrics,
kill, a pty, events, and kill -9 of runtimed with containers running."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
import uuid

import pytest

from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from tests import testimages
from tests.shim.conftest import (  # noqa: F401 - cgroup_check is a fixture
    BUILTIN,
    CGROUP_PARENT,
    CREATED_CGROUPS,
    cgroup_check,
)

IMAGE = testimages.BUSYBOX_NAME
NS = (("containerd-namespace", "default"),)
RUNTIMES = ["runc"] + (["builtin"] if BUILTIN else [])  # builtin: runtimed's default


@pytest.fixture
def leak_check(cgroup_check):  # noqa: F811
    """Replaces the shared cgroup leak check: precise by path (see tests/shim/conftest.py)."""
    yield


@pytest.fixture(scope="module")
def busybox_archive(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("images"))["busybox"].archive


@pytest.fixture(params=RUNTIMES)
def rd(request, daemon, busybox_archive):
    """The daemon with busybox imported (and unpacked); `rd.run_flags()` per container."""
    daemon.ctr("images", "import", busybox_archive)
    runtime = request.param

    def run_flags() -> list[str]:
        cgroup = f"{CGROUP_PARENT}/{uuid.uuid4().hex[:12]}"
        CREATED_CGROUPS.append(cgroup)
        flags = ["--cgroup", cgroup]
        if runtime == "runc":
            flags += ["--runc-binary", "runc"]
        return flags

    daemon.run_flags = run_flags
    started: list[str] = []
    daemon.started = started
    yield daemon
    for id in started:
        daemon.ctr("tasks", "kill", "-s", "SIGKILL", id, check=False)
        for _ in range(50):
            if daemon.ctr("tasks", "rm", id, check=False).returncode == 0:
                break
            if "not found" in daemon.ctr("tasks", "rm", id, check=False).stderr:
                break
            time.sleep(0.1)
        daemon.ctr("containers", "rm", id, check=False)


def run_detached(rd, id: str, *args: str) -> None:
    rd.ctr("run", "-d", *rd.run_flags(), IMAGE, id, *args)
    rd.started.append(id)


def task_rows(rd) -> dict[str, list[str]]:
    lines = rd.ctr("tasks", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split() for line in lines}


def test_run_prints_and_passes_the_exit_code(rd):
    result = rd.ctr("run", "--rm", *rd.run_flags(), IMAGE, "t1", "echo", "hi")
    assert result.stdout == "hi\n"
    failed = rd.ctr("run", "--rm", *rd.run_flags(), IMAGE, "t2", "sh", "-c", "exit 3",
                    check=False)
    assert failed.returncode == 3
    assert rd.ctr("containers", "ls", "-q").stdout.split() == []  # --rm removed both
    assert task_rows(rd) == {}


def test_detached_task_lifecycle(rd):
    run_detached(rd, "d1", "sleep", "1000")
    rows = task_rows(rd)
    assert rows["d1"][2] == "RUNNING"
    pid = int(rows["d1"][1])
    ps = rd.ctr("tasks", "ps", "d1").stdout
    assert str(pid) in ps
    out = rd.ctr("tasks", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo hi from exec")
    assert out.stdout == "hi from exec\n"
    code = rd.ctr("tasks", "exec", "--exec-id", "e2", "d1", "sh", "-c", "exit 4", check=False)
    assert code.returncode == 4
    rd.ctr("tasks", "pause", "d1")
    assert task_rows(rd)["d1"][2] == "PAUSED"
    rd.ctr("tasks", "resume", "d1")
    assert task_rows(rd)["d1"][2] == "RUNNING"
    metrics = rd.ctr("tasks", "metrics", "--format", "json", "d1").stdout
    assert json.loads(metrics)["memory"]["usage"]["usage"] > 0
    info = json.loads(rd.ctr("containers", "info", "d1").stdout)
    assert info["Spec"]["process"]["args"] == ["sleep", "1000"]
    rd.ctr("tasks", "kill", "-s", "SIGKILL", "d1")
    for _ in range(100):
        if task_rows(rd)["d1"][2] == "STOPPED":
            break
        time.sleep(0.05)
    assert task_rows(rd)["d1"][2] == "STOPPED"
    rd.ctr("tasks", "rm", "d1")
    rd.ctr("containers", "rm", "d1")
    assert task_rows(rd) == {}
    assert not (rd.state / "tasks" / "default" / "d1").exists()


def ctr_in_pty(rd, *args: str) -> tuple[int, str]:
    """Run ctr on a 33x97 pty as a person would; its exit code and what it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 97, 0, 0))
    proc = subprocess.Popen(
        rd.ctr_command(*args),
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(30), output.decode(errors="replace")


def test_run_and_exec_with_a_terminal(rd):
    code, text = ctr_in_pty(rd, "run", "-t", "--rm", *rd.run_flags(), IMAGE, "tty1",
                            "sh", "-c", "tty; sleep 1; stty size; exit 6")  # resize follows Start
    assert code == 6
    assert "/dev/pts/" in text and "33 97" in text
    run_detached(rd, "tty2", "sleep", "1000")
    code, text = ctr_in_pty(rd, "tasks", "exec", "-t", "--exec-id", "sh1", "tty2",
                            "sh", "-c", "tty; exit 2")
    assert code == 2 and "/dev/pts/" in text


def test_events_show_the_lifecycle(rd):
    events = subprocess.Popen(["ctr", "-a", rd.address, "events"], stdout=subprocess.PIPE,
                              text=True)
    try:
        time.sleep(0.5)
        rd.ctr("run", "--rm", *rd.run_flags(), IMAGE, "ev1", "true")
        time.sleep(0.5)
    finally:
        events.send_signal(signal.SIGINT)
        out, _ = events.communicate(timeout=10)
    # each line: DATE TIME +0000 UTC NAMESPACE TOPIC EVENT-JSON
    topics = [line.split()[5] for line in out.splitlines() if len(line.split()) > 5]
    lifecycle = [t for t in topics if t.startswith("/tasks/")]
    assert lifecycle == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert "/containers/create" in topics and "/containers/delete" in topics


def test_kill9_runtimed_with_containers_running(rd):
    for i in range(7):
        run_detached(rd, f"k{i}", "sleep", "1000")
    started = time.monotonic()
    for i in range(3):
        run_detached(rd, f"x{i}", "sh", "-c", f"sleep 3; exit {10 + i}")
    rd.kill9()
    assert time.monotonic() - started < 3, "too slow to kill runtimed before x0 exits"
    time.sleep(3.5)  # x0..x2 exit while runtimed is down
    rd.start()
    rows = task_rows(rd)
    expected = {f"k{i}": "RUNNING" for i in range(7)} | {f"x{i}": "STOPPED" for i in range(3)}
    assert {id: row[2] for id, row in rows.items()} == expected
    for i in range(3):  # each exit published exactly once (runtimed's own record)
        bundle = rd.state / "tasks" / "default" / f"x{i}"
        record = json.loads((bundle / "runtimed.json").read_text())
        assert record["init_exit"] is True
    with rd.channel() as channel:
        tasks = tasks_pb2_grpc.TasksStub(channel)
        for i in range(3):
            request = tasks_pb2.GetRequest(container_id=f"x{i}")
            process = tasks.Get(request, metadata=NS, timeout=10).process
            assert process.exit_status == 10 + i
            waited = tasks.Wait(tasks_pb2.WaitRequest(container_id=f"x{i}"), metadata=NS,
                                timeout=10)
            assert waited.exit_status == 10 + i
    for i in range(3):
        rd.ctr("tasks", "rm", f"x{i}")
    out = rd.ctr("tasks", "exec", "--exec-id", "after", "k2", "echo", "still here")
    assert out.stdout == "still here\n"


def test_runtime_names_map_to_shimd(daemon, busybox_archive):
    daemon.ctr("images", "import", busybox_archive)
    cgroup = f"{CGROUP_PARENT}/{uuid.uuid4().hex[:12]}"
    CREATED_CGROUPS.append(cgroup)
    old_name = daemon.ctr("run", "--rm", "--cgroup", cgroup, "--runtime",
                          "io.containerd.runtime.v1.linux", IMAGE, "v1", "echo", "v1 linux")
    assert old_name.stdout == "v1 linux\n"
    unknown = daemon.ctr("run", "--rm", "--runtime", "io.containerd.kata.v2", IMAGE, "k1",
                         "true", check=False)
    assert unknown.returncode != 0 and "not supported" in unknown.stderr
    daemon.ctr("containers", "rm", "k1", check=False)


def test_stdin_reaches_the_container_and_its_eof_too(rd):
    result = rd.ctr("run", "--rm", *rd.run_flags(), IMAGE, "in1", "sh", "-c",
                    "cat; echo end", input="line one\nline two\n")
    assert result.stdout == "line one\nline two\nend\n"


def test_concurrent_runs(rd):
    procs = [
        subprocess.Popen(rd.ctr_command("run", "--rm", *rd.run_flags(), IMAGE,
                                        f"par{i}", "sh", "-c", f"echo {i}; exit {i}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [(code, out) for code, out, _ in results] == [(i, f"{i}\n") for i in range(8)], results
    assert task_rows(rd) == {}
