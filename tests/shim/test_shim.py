"""The real shimd process driving a real OCI runtime (runc, and the built-in one when it
exists) on busybox bundles: lifecycle, exit codes, stdio, exec, pause, and the shim
surviving the process that started it."""

from __future__ import annotations

import json
import os
import select
import signal
import time

import grpc
import pytest

from runtimed.api.shim.v1 import shim_pb2 as pb
from tests.shim.conftest import RUNTIMES

pytestmark = pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r or "builtin")


def read_until_eof(fd: int, timeout: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"no EOF within {timeout}s; got {data!r}")


def fifos(base, name):
    out, err = base / f"{name}.out", base / f"{name}.err"
    os.mkfifo(out)
    os.mkfifo(err)
    # as containerd's clients do: open the read ends before handing the paths over
    return out, err, os.open(out, os.O_RDONLY | os.O_NONBLOCK), os.open(err, os.O_RDONLY | os.O_NONBLOCK)


def create(shim, runtime, **stdio):
    return shim.stub.Create(
        pb.CreateRequest(id=shim.id, bundle=str(shim.bundle), runtime=runtime,
                         stdio=pb.Stdio(**stdio)),
        timeout=30,
    ).pid


def test_run_prints_and_exit_code_passes_through(shims, workdir, runtime):
    shim = shims(["sh", "-c", "echo hello; echo oops >&2; exit 3"])
    out, err, rout, rerr = fifos(workdir, "a")
    pid = create(shim, runtime, stdout=str(out), stderr=str(err))
    assert pid > 0
    state = shim.stub.State(pb.StateRequest(id=shim.id))
    assert state.status == pb.CREATED and state.pid == pid
    shim.stub.Start(pb.StartRequest(id=shim.id))
    waited = shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20)
    assert waited.exit_status == 3
    assert read_until_eof(rout) == b"hello\n"  # and EOF: the shim closed its write end
    assert read_until_eof(rerr) == b"oops\n"
    # Wait after the exit returns the remembered status; so does State
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=5).exit_status == 3
    assert shim.stub.State(pb.StateRequest(id=shim.id)).status == pb.STOPPED
    # the exit status is on disk (the outbox) before it is reported
    records = [json.loads(line) for line in (shim.bundle / "events.jsonl").read_text().splitlines()]
    exits = [r for r in records if r.get("topic") == "/tasks/exit"]
    assert len(exits) == 1 and exits[0]["exit_status"] == 3 and exits[0]["pid"] == pid
    deleted = shim.stub.Delete(pb.DeleteRequest(id=shim.id), timeout=20)
    assert deleted.exit_status == 3
    topics = [e.topic for e in shim.events(count=4)]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    with pytest.raises(grpc.RpcError) as info:
        shim.stub.State(pb.StateRequest(id=shim.id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    os.close(rout)
    os.close(rerr)


def test_signalled_exit_is_128_plus_signal_and_wait_before_start(shims, runtime):
    shim = shims(["sleep", "1000"])
    create(shim, runtime)
    waiter = shim.stub.Wait.future(pb.WaitRequest(id=shim.id), timeout=30)  # before Start
    shim.stub.Start(pb.StartRequest(id=shim.id))
    time.sleep(0.2)
    assert not waiter.done()
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert waiter.result().exit_status == 128 + signal.SIGKILL
    with pytest.raises(grpc.RpcError) as info:
        shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGTERM))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_exec_and_init_exit_kills_the_rest(shims, workdir, runtime):
    shim = shims(["sleep", "1000"])
    create(shim, runtime)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    out, err, rout, rerr = fifos(workdir, "e1")
    process = json.loads((shim.bundle / "config.json").read_text())["process"]
    process["args"] = ["sh", "-c", "echo in $(hostname); exit 7"]
    shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id="e1", process=json.dumps(process).encode(),
                                  stdio=pb.Stdio(stdout=str(out), stderr=str(err))))
    assert shim.stub.State(pb.StateRequest(id=shim.id, exec_id="e1")).status == pb.CREATED
    shim.stub.Start(pb.StartRequest(id=shim.id, exec_id="e1"))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id, exec_id="e1"), timeout=20).exit_status == 7
    assert read_until_eof(rout) == b"in shimtest\n"
    shim.stub.Delete(pb.DeleteRequest(id=shim.id, exec_id="e1"))

    process["args"] = ["sleep", "1000"]
    shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id="e2", process=json.dumps(process).encode()))
    exec_pid = shim.stub.Start(pb.StartRequest(id=shim.id, exec_id="e2")).pid
    pids = {p.pid: p.exec_id for p in shim.stub.Pids(pb.PidsRequest(id=shim.id)).processes}
    assert pids.get(exec_pid) == "e2" and len(pids) == 2
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id, exec_id="e2"), timeout=20).exit_status == 137
    assert not os.path.exists(f"/proc/{exec_pid}")  # killed and reaped
    topics = [(e.topic, e.exec_id) for e in shim.events(count=9)]
    assert topics.index(("/tasks/exec-started", "e1")) < topics.index(("/tasks/exit", "e1"))
    os.close(rout)
    os.close(rerr)


def test_pause_freezes_and_resume_thaws(shims, runtime):
    shim = shims(["sleep", "1000"])
    pid = create(shim, runtime)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    shim.stub.Pause(pb.PauseRequest(id=shim.id))
    assert shim.stub.State(pb.StateRequest(id=shim.id)).status == pb.PAUSED
    time.sleep(0.1)
    from tests.shim.conftest import _proc_state
    assert _proc_state(pid) in ("D", "S")  # frozen tasks sleep in the freezer
    freezer = [line for line in open(f"/proc/{pid}/cgroup") if ":freezer:" in line]
    if freezer:
        path = "/sys/fs/cgroup/freezer" + freezer[0].split(":", 2)[2].strip()
        assert open(f"{path}/freezer.state").read().strip() == "FROZEN"
    shim.stub.Resume(pb.ResumeRequest(id=shim.id))
    assert shim.stub.State(pb.StateRequest(id=shim.id)).status == pb.RUNNING
    shim.stub.Delete(pb.DeleteRequest(id=shim.id, force=True), timeout=20)
    topics = [e.topic for e in shim.events(count=6)]
    assert topics[2:4] == ["/tasks/paused", "/tasks/resumed"]


def test_output_keeps_flowing_when_nobody_reads(shims, workdir, runtime):
    """A client that went away: after OUTPUT_STALL seconds without progress the shim drops
    the oldest output instead of blocking the container for good."""
    shim = shims(["sh", "-c", "head -c 3000000 /dev/zero; echo done >&2"])
    out, err, rout, rerr = fifos(workdir, "big")
    os.close(rout)  # the client went away; the shim holds the FIFO open itself
    create(shim, runtime, stdout=str(out), stderr=str(err))
    shim.stub.Start(pb.StartRequest(id=shim.id))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 0
    assert read_until_eof(rerr) == b"done\n"
    os.close(rerr)


def test_a_slow_reader_gets_every_byte(shims, workdir, runtime):
    """More output than the shim buffers, read slowly: back-pressure, nothing dropped (a
    `ctl export` or `cp` through tar is corrupt if a byte goes missing)."""
    shim = shims(["seq", "1", "600000"])  # ~4.5 MB, four times the shim's buffer
    out, err, rout, rerr = fifos(workdir, "slow")
    create(shim, runtime, stdout=str(out), stderr=str(err))
    shim.stub.Start(pb.StartRequest(id=shim.id))
    data = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        select.select([rout], [], [], 0.1)
        try:
            chunk = os.read(rout, 16384)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
        time.sleep(0.002)  # a reader slower than seq: the shim's buffer fills up
    assert data == b"".join(b"%d\n" % i for i in range(1, 600001))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 0
    os.close(rout)
    os.close(rerr)


def test_terminal_and_resize(shims, workdir, runtime):
    shim = shims(["sh", "-c", "stty size; tty"], terminal=True)
    out = workdir / "tty.out"
    os.mkfifo(out)
    rout = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    create(shim, runtime, stdout=str(out), terminal=True)
    shim.stub.ResizePty(pb.ResizePtyRequest(id=shim.id, width=91, height=37))
    shim.stub.Start(pb.StartRequest(id=shim.id))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 0
    text = read_until_eof(rout).decode()
    assert "37 91" in text and "/dev/pts/" in text
    os.close(rout)


def test_stdin_reaches_the_process_and_close_io(shims, workdir, runtime):
    shim = shims(["sh", "-c", "read line; echo got $line; cat; echo end"])
    stdin, out = workdir / "in", workdir / "o"
    os.mkfifo(stdin)
    os.mkfifo(out)
    rout = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    win = os.open(stdin, os.O_RDWR)  # as ctr: the writer exists before Create
    create(shim, runtime, stdin=str(stdin), stdout=str(out))
    shim.stub.Start(pb.StartRequest(id=shim.id))
    os.write(win, b"abc\nmore\n")
    shim.stub.CloseIO(pb.CloseIORequest(id=shim.id, stdin=True))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 0
    assert read_until_eof(rout) == b"got abc\nmore\nend\n"
    os.close(win)
    os.close(rout)


def test_container_and_shim_outlive_the_launcher_and_events_resume(shims, runtime):
    shim = shims(["sleep", "1000"])
    create(shim, runtime)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    # the shim is not a child of whoever launched it: it is in its own session
    assert os.getsid(shim.pid) == shim.pid
    status = open(f"/proc/{shim.pid}/status").read()
    ppid = int(status.split("PPid:")[1].split()[0])
    assert ppid != os.getpid()
    first = shim.events(count=2)
    shim.stub.Ack(pb.AckRequest(seq=first[0].seq))
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20)
    # a reconnecting runtimed asks for what it has not published yet: nothing twice
    again = shim.events(after=first[1].seq, count=1)
    assert [e.topic for e in again] == ["/tasks/exit"]
    assert again[0].exit_status == 128 + signal.SIGKILL
    connect = shim.stub.Connect(pb.ConnectRequest(id=shim.id))
    assert connect.shim_pid == shim.pid


def test_memory_limit_oom_kill_is_reported(shims, runtime):
    def limit(spec):
        spec["linux"]["resources"]["memory"] = {"limit": 8 << 20, "swap": 8 << 20}

    shim = shims(["sh", "-c", 'x=$(head -c 50000000 /dev/zero | tr "\\0" a); echo survived'],
                 spec_edit=limit)
    create(shim, runtime)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    status = shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=60).exit_status
    assert status == 137
    topics = [e.topic for e in shim.events(count=4)]
    assert "/tasks/oom" in topics


def test_init_exit_kills_the_rest_without_a_pid_namespace(shims, runtime):
    def host_pid_namespace(spec):
        spec["linux"]["namespaces"] = [
            ns for ns in spec["linux"]["namespaces"] if ns["type"] != "pid"
        ]

    shim = shims(["sh", "-c", "sleep 1000 & echo $! > /tmp/bg.pid; sleep 0.5; exit 0"],
                 spec_edit=host_pid_namespace)
    create(shim, runtime)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 0
    background = int((shim.bundle / "rootfs" / "tmp" / "bg.pid").read_text())
    for _ in range(100):
        if not os.path.exists(f"/proc/{background}"):
            break
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{background}")  # killed and reaped, no zombie left
