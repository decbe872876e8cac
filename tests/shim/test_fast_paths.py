"""The built-in runtime's fast paths in the shim (docs/shim.md, "Performance"): create and
exec in workers the single-threaded shim forks itself, the light commands in-process (in
threads that are gone before any fork), hooks in a worker, a failed fork a clear error.

"No process was spawned" is read from the kernel: /proc/<pid>/stat's cminflt (minor
faults of reaped children) grows whenever a process reaps a child, and every child of a
Python process faults pages in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from runtimed.api.shim.v1 import shim_pb2 as pb

PIDS_ROOT = Path("/sys/fs/cgroup/pids")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def reaped_faults(pid: int) -> int:
    return int(_stat(pid)[8])  # cminflt


def ppid(pid: int) -> int:
    return int(_stat(pid)[1])


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def single_threaded_soon(pid: int) -> bool:
    """A joined thread leaves /proc/<pid>/task a moment after its call has returned."""
    deadline = time.monotonic() + 5
    while threads(pid) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads(pid) == 1


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def exec_process(shim, exec_id: str, args: list[str]) -> int:
    process = json.loads((shim.bundle / "config.json").read_text())["process"]
    process["args"] = args
    shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id=exec_id,
                                  process=json.dumps(process).encode()))
    return shim.stub.Start(pb.StartRequest(id=shim.id, exec_id=exec_id)).pid


def namespaces(pid: int) -> dict[str, str]:
    return {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in os.listdir(f"/proc/{pid}/ns")}


def cgroups_of(pid: int) -> list[str]:
    return sorted(Path(f"/proc/{pid}/cgroup").read_text().splitlines())


def privileges(pid: int) -> dict[str, str]:
    keys = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
            "NoNewPrivs", "Seccomp")
    lines = (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: v.strip() for k, v in lines if k in keys}


def nspid(pid: int) -> list[str]:
    return [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("NSpid:")][0].split()[1:]


def test_create_and_exec_fork_from_the_single_threaded_shim(shims):
    shim = shims(["sleep", "1000"])
    assert threads(shim.worker()) == 1  # h2server on asyncio: no gRPC core threads
    assert children(shim.worker()) == []  # no helper process either
    own = namespaces(shim.worker())
    before = reaped_faults(shim.worker())
    pid = shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30).pid
    assert reaped_faults(shim.worker()) == before  # forked by the shim itself: no worker reaped
    assert ppid(pid) == shim.worker()
    assert nspid(pid) == [str(pid), "1"]  # pid 1 of its own pid namespace
    assert not (shim.bundle / "init.pid").exists()  # its pid is Create's answer, no file
    # the runtime's state is in the bundle itself: no directory of its own
    assert json.loads((shim.bundle / "state.json").read_text())["pid"] == pid
    assert (shim.bundle / "state.json").stat().st_mode & 0o777 == 0o600  # (it holds the spec)
    assert not (shim.bundle / "runtime").exists()
    init_ns = namespaces(pid)
    assert all(init_ns[n] != own[n] for n in ("pid", "mnt", "uts", "ipc", "net"))
    assert namespaces(shim.worker()) == own  # the shim's next children are its own again
    shim.stub.Start(pb.StartRequest(id=shim.id))
    before = reaped_faults(shim.worker())
    exec_pid = exec_process(shim, "e1", ["sleep", "1000"])
    assert reaped_faults(shim.worker()) == before  # forked by the shim itself: no worker reaped
    assert ppid(exec_pid) == shim.worker()
    assert sorted(children(shim.worker())) == sorted([pid, exec_pid])
    # in every namespace and cgroup of the init, the pid namespace included (its own pid
    # there is not 1); the shim joined that pid namespace for the fork only
    exec_ns = namespaces(exec_pid)
    assert {n: exec_ns[n] for n in init_ns if n != "pid_for_children"} == {
        n: v for n, v in init_ns.items() if n != "pid_for_children"}
    assert nspid(exec_pid)[0] == str(exec_pid) and len(nspid(exec_pid)) == 2
    assert nspid(exec_pid)[1] != "1"
    assert cgroups_of(exec_pid) == cgroups_of(pid)
    assert namespaces(shim.worker()) == own
    assert privileges(exec_pid) == privileges(pid)  # the same process spec as the init's
    assert privileges(pid)["NoNewPrivs"] == "1" and privileges(pid)["CapBnd"] != privileges(
        shim.worker())["CapBnd"]  # (runc's spec: what the comparison compares is restricted)
    shim.stub.Kill(pb.KillRequest(id=shim.id, exec_id="e1", signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id, exec_id="e1"), timeout=20).exit_status == 137
    # the exit was in the outbox (the durable record) before Wait answered
    records = [json.loads(line) for line in (shim.bundle / "events.jsonl").read_text().splitlines()]
    assert any(r.get("topic") == "/tasks/exit" and r.get("exec_id") == "e1"
               and r.get("exit_status") == 137 and r.get("pid") == exec_pid for r in records)
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137
    assert single_threaded_soon(shim.worker())


def test_a_failed_create_in_the_shim_is_typed_and_leaves_nothing(shims):
    shim = shims(["no-such-binary"])
    own = namespaces(shim.worker())
    watch_fds = _oom_watch_fds(shim.worker())
    with pytest.raises(grpc.RpcError) as info:
        shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _oom_watch_fds(shim.worker()) == watch_fds  # the OOM watch armed in the setup is closed
    # the outbox file was made during the setup, and holds no event of the failed create
    assert (shim.bundle / "events.jsonl").read_bytes() == b""
    assert not (shim.bundle / "init.pid").exists()  # none: the shim forked the init itself
    assert "executable file not found" in info.value.details(), info.value.details()
    assert not (shim.bundle / "state.json").exists()  # state gone (cgroup: cgroup_check)
    assert not (shim.bundle / "exec.fifo").exists()
    deadline = time.monotonic() + 5
    while children(shim.worker()) and time.monotonic() < deadline:  # killed, then reaped
        time.sleep(0.01)
    assert children(shim.worker()) == [] and namespaces(shim.worker()) == own
    last = json.loads((shim.bundle / "runtime.log").read_text().splitlines()[-1])
    assert last["level"] == "error" and "executable file not found" in last["msg"]
    # and exec of a missing binary, likewise
    spec = json.loads((shim.bundle / "config.json").read_text())
    spec["process"]["args"] = ["sleep", "1000"]
    (shim.bundle / "config.json").write_text(json.dumps(spec))
    pid = shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30).pid
    shim.stub.Start(pb.StartRequest(id=shim.id))
    with pytest.raises(grpc.RpcError) as info:
        exec_process(shim, "e1", ["no-such-binary"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "exec failed" in info.value.details() and "no-such-binary" in info.value.details()
    deadline = time.monotonic() + 5
    while children(shim.worker()) != [pid] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert children(shim.worker()) == [pid]
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137
    shim.stub.Delete(pb.DeleteRequest(id=shim.id), timeout=20)


def _oom_watch_fds(pid: int) -> int:
    """The fds an OOM watcher holds: an eventfd (cgroup v1) or an inotify (v2)."""
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(_readlink(f"/proc/{pid}/fd/{fd}") in ("anon_inode:[eventfd]", "anon_inode:inotify")
               for fd in fds)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return ""


def test_light_commands_spawn_nothing(shims):
    shim = shims(["sleep", "1000"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    before = reaped_faults(shim.worker())
    shim.stub.Start(pb.StartRequest(id=shim.id))
    shim.stub.Pause(pb.PauseRequest(id=shim.id))
    assert shim.stub.State(pb.StateRequest(id=shim.id)).status == pb.PAUSED
    shim.stub.Resume(pb.ResumeRequest(id=shim.id))
    pids = [p.pid for p in shim.stub.Pids(pb.PidsRequest(id=shim.id)).processes]
    shim.stub.Update(pb.UpdateRequest(id=shim.id, resources=json.dumps(
        {"pids": {"limit": 50}}).encode()))
    assert shim.stub.Stats(pb.StatsRequest(id=shim.id)).stats.value
    assert reaped_faults(shim.worker()) == before  # no runtime process was started (or reaped)
    assert single_threaded_soon(shim.worker())  # the blocking ones ran in threads that are gone
    assert len(pids) == 1
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137
    shim.stub.Delete(pb.DeleteRequest(id=shim.id), timeout=20)


def test_errors_of_in_process_commands_are_typed_and_logged_like_the_command_lines(shims):
    shim = shims(["sleep", "1000"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    state = shim.bundle / "state.json"
    state.rename(state.with_suffix(".hidden"))
    try:
        with pytest.raises(grpc.RpcError) as info:
            shim.stub.Pause(pb.PauseRequest(id=shim.id))
    finally:
        state.with_suffix(".hidden").rename(state)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "shimd.oci pause" in info.value.details() and "does not exist" in info.value.details()
    last = json.loads((shim.bundle / "runtime.log").read_text().splitlines()[-1])
    assert last["level"] == "error" and "does not exist" in last["msg"]
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137


def test_hooks_run_outside_the_shim_process(shims, workdir):
    marker = workdir / "poststart-ran"

    def hooks(spec):
        spec["hooks"] = {"poststart": [
            {"path": "/bin/sh", "args": ["sh", "-c", f"echo ok > {marker}"]}]}

    shim = shims(["sleep", "1000"], spec_edit=hooks)
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    before = reaped_faults(shim.worker())
    shim.stub.Start(pb.StartRequest(id=shim.id))
    assert marker.read_text() == "ok\n"  # the hook's exit status was not reaped from under it
    assert reaped_faults(shim.worker()) > before  # `start` ran in a worker
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137


@pytest.mark.skipif(not (PIDS_ROOT / "cgroup.procs").exists(),
                    reason="needs the cgroup v1 pids hierarchy (this machine's layout)")
def test_a_failed_fork_is_resource_exhausted_and_the_shim_carries_on(shims):
    shim = shims(["sleep", "1000"])
    cgroup = PIDS_ROOT / f"runtimed-test-shim-{os.getpid()}"
    cgroup.mkdir()
    try:
        shim_processes = [shim.pid, shim.worker()]  # its keeper and worker (shimd/keeper.py)
        for pid in shim_processes:
            (cgroup / "cgroup.procs").write_text(str(pid))
        (cgroup / "pids.max").write_text("2")  # the shim itself, no room for a fork
        with pytest.raises(grpc.RpcError) as info:
            shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot fork" in info.value.details(), info.value.details()
        assert "Traceback" not in shim.log()
        (cgroup / "pids.max").write_text("max")
        pid = shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)),
                               timeout=30).pid
        assert ppid(pid) == shim.worker()
    finally:
        for pid in shim_processes:
            with contextlib.suppress(ProcessLookupError):
                (PIDS_ROOT / "cgroup.procs").write_text(str(pid))
        cgroup.rmdir()
    shim.stub.Start(pb.StartRequest(id=shim.id))
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137


def test_deleting_a_stopped_init_takes_no_thread(shims):
    """Its delete waits for nothing (the init reaped, its cgroup empty), so it runs on
    the shim's loop: under a pids limit that leaves room for no thread it still works."""
    shim = shims(["true"])
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    shim.stub.Start(pb.StartRequest(id=shim.id))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 0
    cgroup = PIDS_ROOT / f"runtimed-test-shim-{os.getpid()}"
    cgroup.mkdir()
    shim_processes = [shim.pid, shim.worker()]
    try:
        for pid in shim_processes:
            (cgroup / "cgroup.procs").write_text(str(pid))
        (cgroup / "pids.max").write_text("2")  # the shim itself, no room for a thread
        shim.stub.Delete(pb.DeleteRequest(id=shim.id), timeout=20)
        assert not (shim.bundle / "state.json").exists()  # the runtime's state gone
    finally:
        for pid in shim_processes:
            with contextlib.suppress(ProcessLookupError):
                (PIDS_ROOT / "cgroup.procs").write_text(str(pid))
        cgroup.rmdir()


def test_an_ack_after_shutdown_writes_nothing_into_the_bundle(tmp_path):
    """runtimed removes the bundle right after Shutdown; a late Ack must not recreate
    events.jsonl in it (the torture suite's 100 lifecycles left such bundles behind)."""
    import asyncio

    from shimd.reaper import Reaper
    from shimd.shim import Shim

    async def scenario() -> None:
        shim = Shim("c1", tmp_path, Reaper())
        await shim.outbox.append("/tasks/create", id="c1")
        shim.ack(1)
        assert json.loads((tmp_path / "events.jsonl").read_text().splitlines()[0]) == {"acked": 1}
        await shim.outbox.append("/tasks/delete", id="c1")
        assert shim.shutdown(now=True)
        (tmp_path / "events.jsonl").unlink()  # what runtimed's bundle removal does
        shim.ack(2)
        assert list(tmp_path.iterdir()) == []

    asyncio.run(scenario())


def test_seccomp_filter_is_compiled_during_create_and_enforced_after_start(shims, workdir):
    from tests.shim.test_shim import fifos, read_until_eof

    def deny_mkdir(spec):
        spec["process"]["noNewPrivileges"] = True
        spec["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                          "errnoRet": 1}],
        }

    shim = shims(["sh", "-c", "mkdir /tmp/x || echo refused"], spec_edit=deny_mkdir)
    out, err, rout, rerr = fifos(workdir, "s")
    pid = shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle),
                                            stdio=pb.Stdio(stdout=str(out), stderr=str(err))),
                           timeout=30).pid
    held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert any(link.startswith("/memfd:seccomp") for link in held), held  # compiled already
    shim.stub.Start(pb.StartRequest(id=shim.id))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 0
    assert read_until_eof(rout) == b"refused\n"
    assert b"Operation not permitted" in read_until_eof(rerr)
    shim.stub.Delete(pb.DeleteRequest(id=shim.id), timeout=20)
    os.close(rout)
    os.close(rerr)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "no-cache"])
def test_exec_installs_the_filter_compiled_at_create(shims, workdir, monkeypatch, cache):
    """exec installs the program create compiled: the seccomp cache's entry for the
    profile (no copy per container), or the container's own seccomp.bpf without a cache."""
    from tests.shim.test_shim import fifos, read_until_eof

    cache_dir = workdir / "seccomp-cache"
    monkeypatch.setenv("SHIMD_OCI_SECCOMP_CACHE", str(cache_dir) if cache else "")

    def deny_mkdir(spec):
        spec["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                          "errnoRet": 1}],
        }

    shim = shims(["sleep", "1000"], spec_edit=deny_mkdir)
    shim.stub.Create(pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), timeout=30)
    kept = shim.bundle / "seccomp.bpf"
    assert kept.exists() != cache
    program = next(cache_dir.iterdir()) if cache else kept
    assert program.stat().st_size > 0 and program.stat().st_size % 8 == 0  # sock_filter[]
    shim.stub.Start(pb.StartRequest(id=shim.id))
    out, err, rout, rerr = fifos(workdir, "x")
    process = json.loads((shim.bundle / "config.json").read_text())["process"]
    process["args"] = ["sh", "-c", "mkdir /tmp/y || echo refused"]
    shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id="x1", process=json.dumps(process).encode(),
                                  stdio=pb.Stdio(stdout=str(out), stderr=str(err))))
    shim.stub.Start(pb.StartRequest(id=shim.id, exec_id="x1"))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id, exec_id="x1"), timeout=20).exit_status == 0
    assert read_until_eof(rout) == b"refused\n"
    assert b"Operation not permitted" in read_until_eof(rerr)
    os.close(rout)
    os.close(rerr)
    # the saved program is what exec installs: swapped for "allow everything", mkdir works
    import struct

    program.write_bytes(struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K ALLOW
    out, err, rout, rerr = fifos(workdir, "y")
    process["args"] = ["sh", "-c", "mkdir /tmp/y && echo made"]
    shim.stub.Exec(pb.ExecRequest(id=shim.id, exec_id="x2", process=json.dumps(process).encode(),
                                  stdio=pb.Stdio(stdout=str(out), stderr=str(err))))
    shim.stub.Start(pb.StartRequest(id=shim.id, exec_id="x2"))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id, exec_id="x2"), timeout=20).exit_status == 0
    assert read_until_eof(rout) == b"made\n"
    shim.stub.Kill(pb.KillRequest(id=shim.id, signal=signal.SIGKILL))
    assert shim.stub.Wait(pb.WaitRequest(id=shim.id), timeout=20).exit_status == 137
    shim.stub.Delete(pb.DeleteRequest(id=shim.id), timeout=20)
    assert program.exists() == cache  # a kept copy goes with the container's runtime state
    os.close(rout)
    os.close(rerr)


def test_writes_of_one_loop_pass_leave_as_one_send():
    """The shim's server (runtimed/services/h2server.py) sends the SETTINGS ack and a unary
    answer's headers, message and trailers as one write at the end of the loop's pass
    (each send woke runtimed on its own: 16 -> 5 sends per exec, strace), in order."""
    import asyncio

    from runtimed.http2 import (
        ACK,
        END_HEADERS,
        END_STREAM,
        HEADERS,
        PREFACE,
        SETTINGS,
        encode_frame,
        encode_headers,
    )
    from runtimed.services.h2server import Connection
    from shimd.service import ShimServer, ShimService

    class Transport:
        def __init__(self):
            self.sent, self.closed = [], False

        def write(self, data):
            self.sent.append([bytes(data)])

        def writelines(self, parts):
            assert not self.closed
            self.sent.append([bytes(part) for part in parts])

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

    async def scenario():
        server = ShimServer(ShimService(None))
        server.loop = asyncio.get_running_loop()
        transport = Transport()
        conn = Connection(server)
        conn.connection_made(transport)
        assert len(transport.sent) == 1  # our SETTINGS, at once
        body = pb.ConnectRequest().SerializeToString()
        headers = encode_headers([(":method", "POST"), (":scheme", "http"), (":path",
                                  "/runtimed.shim.v1.Shim/Connect"), (":authority", "shim"),
                                  ("content-type", "application/grpc")])
        conn.data_received(PREFACE + encode_frame(SETTINGS, 0, 0, b"")
                           + encode_frame(HEADERS, END_HEADERS, 1, headers)
                           + encode_frame(0, END_STREAM, 1, b"\x00" + len(body).to_bytes(4, "big") + body))
        assert len(transport.sent) == 1  # nothing more within this pass
        await asyncio.sleep(0)
        assert len(transport.sent) == 2  # then one write: ack, headers, message, trailers
        kinds = []
        data = b"".join(transport.sent[1])
        while data:
            length = int.from_bytes(data[:3], "big")
            kinds.append((data[3], data[4]))
            data = data[9 + length:]
        assert kinds == [(SETTINGS, ACK), (HEADERS, END_HEADERS), (0, 0),
                         (HEADERS, END_HEADERS | END_STREAM)]
        conn.connection_lost(None)

    asyncio.run(scenario())


def test_the_zygote_imports_no_grpc_stack():
    """What every shim inherits (the zygote's preload, one call served and made) holds no
    grpcio and no grpclib/h2/hpack (their memory and, for grpcio, threads), and one thread."""
    import subprocess
    import sys

    script = ("import sys, threading; from shimd.zygote import preload; preload(); "
              "print(sorted({m.split('.')[0] for m in sys.modules} & "
              "{'grpc', 'grpclib', 'h2', 'hpack'}), threading.active_count(), "
              "'runtimed.services.h2server' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["[]", "1", "True"]


@pytest.mark.parametrize("lines, error", [
    (b"pid 12x\nready\n", "malformed report"),
    (b"userns 7\n", "id maps failed"),
])
def test_a_report_that_raises_fails_the_wait_on_it(lines, error):
    """What the report raises while it is fed on the loop (a malformed "pid" line, a
    failing callback) fails the create or exec waiting on it, instead of going to the
    loop's exception handler and leaving the wait unanswered."""
    import asyncio

    from shimd.oci.commands import SyncReport
    from shimd.runtime import _read_report

    def on_userns(pid: int) -> None:
        raise OSError(f"id maps failed for {pid}")

    r, w = os.pipe()
    os.write(w, lines)  # the writer stays open: only the report can end the wait

    async def read():
        return await asyncio.wait_for(_read_report(r, SyncReport(on_userns=on_userns)), 10)

    try:
        with pytest.raises((ValueError, OSError), match=error):
            asyncio.run(read())
    finally:
        os.close(w)


def test_the_worker_loop_checks_signals_without_building_valid_signals(monkeypatch):
    """A worker adds and removes its SIGCHLD and SIGTERM handlers without asyncio's
    `signal.valid_signals()` (a set of ~65 enums built on every call), and still refuses
    what is no signal."""
    from shimd.reaper import WorkerLoop

    calls = []
    real = signal.valid_signals
    monkeypatch.setattr(signal, "valid_signals", lambda: calls.append(1) or real())
    loop = WorkerLoop()
    try:
        woken = []
        loop.add_signal_handler(signal.SIGCHLD, woken.append, "chld")
        loop.add_signal_handler(signal.SIGTERM, woken.append, "term")
        os.kill(os.getpid(), signal.SIGCHLD)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert woken == ["chld"]
        assert loop.remove_signal_handler(signal.SIGTERM)
        for bad, error in ((0, ValueError), (signal.NSIG, ValueError), ("15", TypeError)):
            with pytest.raises(error):
                loop.add_signal_handler(bad, woken.append)
    finally:
        loop.close()
    assert calls == []
