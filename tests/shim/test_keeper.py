"""A shim is a keeper and, while there is work, a worker (shimd/keeper.py): an idle worker
hands its state and fds back and exits; the keeper forks the next one for a call, for
the container's stdio, for an OOM kill or for an exit it reaped, and that worker carries
on where the last one stopped. Real shims, real containers (the built-in runtime)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc

from runtimed.api.shim.v1 import shim_pb2 as pb
from runtimed.api.shim.v1 import shim_pb2_grpc
from shimd.runtime import BUILTIN
from tests.shim.conftest import REPO, _comm


def workers(shim) -> list[int]:
    children = Path(f"/proc/{shim.pid}/task/{shim.pid}/children").read_text().split()
    return [int(c) for c in children if _comm(int(c)).startswith("shimw-")]


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def eventually(predicate, timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def retire(shim) -> None:
    """Hang up, and wait until the shim is its keeper alone. The test's next call dials
    again (a gRPC channel connects on its first call)."""
    shim.channel.close()
    shim.channel = grpc.insecure_channel(shim.address)
    shim.stub = shim_pb2_grpc.ShimStub(shim.channel)
    eventually(lambda: not workers(shim), what="the worker retires")


def outbox(shim) -> list[dict]:
    path = shim.bundle / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if "seq" in line]


def read_some(fd: int, timeout: float = 15) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no output"
    return os.read(fd, 65536)


def test_an_idle_shim_is_its_keeper_alone_and_wakes_for_stdin_calls_and_exits(shims, workdir):
    shim = shims(["sh", "-c", "read line; echo got $line; sleep 1000"])
    stdin, stdout = workdir / "in", workdir / "out"
    os.mkfifo(stdin)
    os.mkfifo(stdout)
    reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pid = shim.stub.Create(pb.CreateRequest(
            id=shim.id, bundle=str(shim.bundle),
            stdio=pb.Stdio(stdin=str(stdin), stdout=str(stdout))), timeout=30).pid
        shim.stub.Start(pb.StartRequest(id=shim.id))
        retire(shim)
        assert ppid(pid) == shim.pid  # orphaned by its worker: the keeper's child now
        # input for the container: the keeper forks a worker, which pumps it through
        writer = os.open(stdin, os.O_WRONLY)
        os.write(writer, b"hello\n")
        assert read_some(reader) == b"got hello\n"
        os.close(writer)
        eventually(lambda: not workers(shim), what="the worker retires after the input")
        # a call: the next worker knows the task and runs an exec
        assert shim.stub.State(pb.StateRequest(id=shim.id)).status == pb.RUNNING
        process = json.loads((shim.bundle / "config.json").read_text())["process"]
        process["args"] = ["sh", "-c", "exit 7"]
        shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id="e1",
                                      process=json.dumps(process).encode()))
        shim.stub.Start(pb.StartRequest(id=shim.id, exec_id="e1"))
        assert shim.stub.Wait(pb.WaitRequest(id=shim.id, exec_id="e1"),
                              timeout=20).exit_status == 7
        retire(shim)
        # the init killed behind the shim's back: the keeper reaps it and a worker reports it
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: any(e["topic"] == "/tasks/exit" and e.get("exec_id", "") == ""
                               for e in outbox(shim)), what="the exit in the outbox")
        exit = next(e for e in outbox(shim) if e["topic"] == "/tasks/exit" and not e["exec_id"])
        assert exit["exit_status"] == 137 and exit["pid"] == pid
        assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137
        assert shim.stub.State(pb.StateRequest(id=shim.id)).status == pb.STOPPED
    finally:
        os.close(reader)


def test_exits_of_a_retired_shim_with_no_stdio_are_reported(shims):
    """Nothing but the exits wakes the keeper here (no pipe to hang up): the init's and a
    running exec's, both reaped by the keeper, reach the outbox."""
    shim = shims(["sh", "-c", "while [ ! -e /go2 ]; do sleep 0.1; done; exit 3"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    process = json.loads((shim.bundle / "config.json").read_text())["process"]
    process["args"] = ["sh", "-c", "while [ ! -e /go ]; do sleep 0.1; done; exit 4"]
    shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id="e1", process=json.dumps(process).encode()))
    shim.stub.Start(pb.StartRequest(id=shim.id, exec_id="e1"))
    retire(shim)

    def exits() -> dict[str, int]:
        return {e["exec_id"]: e["exit_status"] for e in outbox(shim) if e["topic"] == "/tasks/exit"}

    (shim.bundle / "rootfs" / "go").touch()
    eventually(lambda: exits() == {"e1": 4}, what=f"the exec's exit in the outbox: {exits()}")
    retire(shim)
    shim.stub.State(pb.StateRequest(id=shim.id))  # a worker after an exit acknowledged
    before = cpu_seconds(shim.pid)
    time.sleep(1)
    assert cpu_seconds(shim.pid) - before < 0.5  # the keeper waits, it does not spin
    retire(shim)
    (shim.bundle / "rootfs" / "go2").touch()
    eventually(lambda: exits() == {"e1": 4, "": 3}, what=f"the init's exit: {exits()}")


def test_a_rotated_cri_log_and_a_terminal_carry_on_across_workers(shims, workdir):
    """The pumps a worker restores write where the last one wrote: the same rotated CRI
    log (stdout and stderr into one file, the open file even when its directory moved),
    the same terminal."""
    shim = shims(["sh", "-c", "read x; echo out-$x; echo err-$x >&2; sleep 1000"])
    stdin, logs = workdir / "in", workdir / "logs"
    logs.mkdir()
    os.mkfifo(stdin)
    uri = f"file://{logs / 'c.log'}?format=cri&max-size=100000&max-file=2"
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle), stdio=pb.Stdio(
        stdin=str(stdin), stdout=uri, stderr=uri)), timeout=30)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    retire(shim)
    # the next worker writes into the file the last one had open, wherever it is now
    log = workdir / "moved" / "c.log"
    logs.rename(log.parent)
    writer = os.open(stdin, os.O_WRONLY)
    try:
        os.write(writer, b"1\n")
        eventually(lambda: log.exists() and log.read_text().count("\n") == 2, what="two records")
    finally:
        os.close(writer)
    records = sorted(line.split(" ", 1)[1] for line in log.read_text().splitlines())
    assert records == ["stderr F err-1", "stdout F out-1"]

    tty = shims(["sh", "-c", "read x; echo tty-$x; sleep 1000"], terminal=True)
    stdin, stdout = workdir / "tin", workdir / "tout"
    os.mkfifo(stdin)
    os.mkfifo(stdout)
    reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    try:
        tty.stub.Create(pb.CreateRequest(id=tty.id, bundle=str(tty.bundle), stdio=pb.Stdio(
            stdin=str(stdin), stdout=str(stdout), terminal=True)), timeout=30)
        tty.stub.Start(pb.StartRequest(id=tty.id))
        retire(tty)
        writer = os.open(stdin, os.O_WRONLY)
        os.write(writer, b"2\n")
        seen = b""
        deadline = time.monotonic() + 15
        while b"tty-2" not in seen and time.monotonic() < deadline:
            seen += read_some(reader)
        assert b"tty-2" in seen  # through the pty: echoed input, then the output
        os.close(writer)
        tty.stub.ResizePty(pb.ResizePtyRequest(id=tty.id, width=100, height=40))
    finally:
        os.close(reader)


def test_an_exit_the_keeper_reaps_reaches_the_running_worker(shims):
    shim = shims(["sleep", "1000"])
    pid = shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30).pid
    shim.stub.Start(pb.StartRequest(id=shim.id))
    retire(shim)
    waiting = shim.stub.Wait.future(pb.WaitRequest(id=shim.id), timeout=20)
    eventually(lambda: workers(shim), what="a worker for the call")
    assert ppid(pid) == shim.pid
    os.kill(pid, signal.SIGKILL)
    assert waiting.result().exit_status == 137


def test_an_oom_kill_wakes_the_keeper(shims, workdir):
    def limit(spec):
        spec["linux"]["resources"]["memory"] = {"limit": 8 << 20, "swap": 8 << 20}

    shim = shims(["sh", "-c", "while [ ! -e /go ]; do sleep 0.1; done; "
                              "head -c 50000000 /dev/zero | sort >/dev/null; sleep 1000"],
                 spec_edit=limit)
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    retire(shim)
    (shim.bundle / "rootfs" / "go").touch()
    eventually(lambda: any(e["topic"] == "/tasks/oom" for e in outbox(shim)),
               what="/tasks/oom in the outbox")
    assert shim.stub.State(pb.StateRequest(id=shim.id)).status == pb.RUNNING


def test_a_worker_whose_state_does_not_fit_a_message_stays(shims):
    """An exec not started yet is part of the state; one with ~300 KB of environment does
    not fit the keeper's socket: the worker serves on instead of losing it."""
    shim = shims(["sleep", "1000"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    process = json.loads((shim.bundle / "config.json").read_text())["process"]
    process["args"] = ["sh", "-c", 'exit ${#B2}']
    process["env"] = [*process.get("env", []), *(f"B{i}=" + "x" * 100_000 for i in range(3))]
    shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id="big", process=json.dumps(process).encode()))
    worker = shim.worker()
    retire_attempt = "cannot hand over to the keeper"
    shim.channel.close()
    eventually(lambda: retire_attempt in shim.log(), what="a retirement tried")
    assert workers(shim) == [worker]
    shim.channel = grpc.insecure_channel(shim.address)
    shim.stub = shim_pb2_grpc.ShimStub(shim.channel)
    shim.stub.Start(pb.StartRequest(id=shim.id, exec_id="big"))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id, exec_id="big"),
                          timeout=20).exit_status == 100_000 % 256


PIDS_ROOT = Path("/sys/fs/cgroup/pids")


def test_a_keeper_that_cannot_fork_a_worker_tries_again(shims):
    """A pids limit on the keeper: a call waits (the connection in the socket's backlog)
    until a fork works again; the shim and its container carry on."""
    shim = shims(["sleep", "1000"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    retire(shim)
    cgroup = PIDS_ROOT / f"runtimed-test-keeper-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "cgroup.procs").write_text(str(shim.pid))
        (cgroup / "pids.max").write_text("1")
        state = shim.stub.State.future(pb.StateRequest(id=shim.id), timeout=30)
        eventually(lambda: "cannot fork a shim worker" in shim.log(), what="a failed fork")
        assert not state.done() and shim.alive()
        (cgroup / "pids.max").write_text("max")
        assert state.result().status == pb.RUNNING
    finally:
        (PIDS_ROOT / "cgroup.procs").write_text(str(shim.pid))
        for pid in (cgroup / "cgroup.procs").read_text().split():  # its worker, if any
            (PIDS_ROOT / "cgroup.procs").write_text(pid)
        cgroup.rmdir()


def test_a_worker_that_dies_ends_the_shim(shims):
    shim = shims(["sleep", "1000"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    os.kill(shim.worker(), signal.SIGKILL)
    eventually(lambda: not shim.alive(), what="the keeper ends")
    assert not (shim.bundle / "address").exists()
    assert "without handing its state back" in shim.log()
    remove_container(shim)


def test_the_worker_dies_with_its_keeper(shims):
    shim = shims(["sleep", "1000"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    worker = shim.worker()
    os.kill(shim.pid, signal.SIGKILL)
    eventually(lambda: not Path(f"/proc/{worker}").exists()
               or "Z" in Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0],
               what="the worker goes with its keeper")
    remove_container(shim)


def remove_container(shim) -> None:
    """What runtimed does after a dead shim: the runtime removes the container."""
    subprocess.run([*BUILTIN, "--root", str(shim.bundle), "delete", "--force",
                    shim.id], check=True, cwd=REPO, timeout=30)


def test_a_counter_watch_wakes_the_keeper_only_once_its_counter_moves(tmp_path):
    """cgroup v2's memory.events changes on every reclaim at memory.max: the keeper forks a
    worker for that watch only once `oom_kill` grows, and that worker reports the kill.
    This machine's cgroups are v1, so a file stands in for memory.events (inotify sees it
    the same) and a stand-in worker for the shim: the real V2 watcher, the real retire
    message (shimd.server.retirement) and the real Keeper."""
    from shimd.cgroups import restore_oom_watcher
    from shimd.cgroups.v2 import V2OOMWatcher
    from shimd.keeper import Keeper
    from shimd.server import retirement

    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")

    def rewrite(text: str) -> None:
        """In place, one pwrite of the same length (the values stay one digit): the keeper
        never reads the file truncated or half written, as the kernel's file never is
        (a torn `oom_kill ` read as "unreadable", and a worker was forked for it)."""
        fd = os.open(events, os.O_WRONLY)
        try:
            os.pwrite(fd, text.encode(), 0)
        finally:
            os.close(fd)
    news_r, news_w = os.pipe()  # each worker writes what it saw: "retired", or the kills
    keeper = os.fork()
    if keeper == 0:
        code = 1
        try:
            os.close(news_r)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(tmp_path / "keeper.sock"))
            listener.listen()

            def work(keeper, channel) -> int:
                if keeper.state is None:  # the first: hand the watch over and go
                    watcher = V2OOMWatcher(str(tmp_path))
                    data, fds = retirement(lambda keep: {"oom": watcher.snapshot(keep)}, 0)
                    socket.send_fds(channel, [data], fds)
                    os.write(news_w, b"retired\n")
                    return 0
                watcher = restore_oom_watcher(json.loads(keeper.state)["oom"], keeper.fds)
                os.write(news_w, f"kills {watcher.read()}\n".encode())
                channel.send(json.dumps({"shutdown": True}).encode())
                return 0

            code = Keeper(listener, work).run()
        finally:
            os._exit(code)
    os.close(news_w)
    try:
        assert read_some(news_r) == b"retired\n"
        for high in range(1, 6):  # reclaim at the limit: the counters beside oom_kill move
            rewrite(f"low 0\nhigh {high}\nmax {high}\noom 0\noom_kill 0\n")
            time.sleep(0.05)
        ready, _, _ = select.select([news_r], [], [], 1.0)
        assert not ready, os.read(news_r, 100)  # no worker for those
        rewrite("low 0\nhigh 6\nmax 6\noom 1\noom_kill 1\n")
        assert read_some(news_r) == b"kills 1\n"
        _, status = os.waitpid(keeper, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # the worker said the shim ends
        keeper = 0
    finally:
        os.close(news_r)
        if keeper:
            os.kill(keeper, signal.SIGKILL)
            os.waitpid(keeper, 0)
