"""The containerd Tasks service on a real runtimed: containers made through the Containers
API with a busybox spec, root filesystems as bind mounts, real shims and runc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from runtimed.api.containerd.events import task_pb2 as task_events
from runtimed.api.containerd.runtime.v2.runc.options import oci_pb2
from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.types import mount_pb2
from runtimed.api.containerd.types.task import task_pb2
from tests.conftest import DaemonProcess
from tests.shim.conftest import cgroup_check, make_rootfs, make_spec  # noqa: F401
from tests.shim.test_shim import read_until_eof

SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
MD = (("containerd-namespace", "tt"),)


@pytest.fixture
def leak_check(cgroup_check):  # noqa: F811
    """Replaces the shared cgroup leak check here: ours is precise by path, so tests that run
    at the same time elsewhere neither fail ours nor get their containers killed by it."""
    yield


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    path = tmp_path_factory.mktemp("busybox") / "rootfs"
    make_rootfs(path)
    return path


class Client:
    def __init__(self, daemon, rootfs):
        self.daemon = daemon
        self.rootfs = rootfs
        self.connect()
        self.created: list[str] = []

    def connect(self):
        self.channel = self.daemon.channel()
        self.containers = containers_pb2_grpc.ContainersStub(self.channel)
        self.tasks = tasks_pb2_grpc.TasksStub(self.channel)
        self.events = events_pb2_grpc.EventsStub(self.channel)

    def container(self, id: str, args: list[str], binary: str = "runc", edit=None):
        spec = make_spec(args)
        if edit is not None:
            edit(spec)
        container = containers_pb2.Container(id=id, snapshotter="overlayfs")
        container.runtime.name = "io.containerd.runc.v2"
        if binary:
            container.runtime.options.Pack(oci_pb2.Options(binary_name=binary), type_url_prefix="")
            container.runtime.options.type_url = "containerd.runc.v1.Options"
        container.spec.type_url = SPEC_URL
        container.spec.value = json.dumps(spec).encode()
        self.containers.Create(containers_pb2.CreateContainerRequest(container=container),
                               metadata=MD)
        self.created.append(id)
        return spec

    def create_task(self, id: str, timeout: float = 60, **stdio) -> int:
        rootfs = [mount_pb2.Mount(type="bind", source=str(self.rootfs), options=["rbind", "rw"])]
        return self.tasks.Create(
            tasks_pb2.CreateTaskRequest(container_id=id, rootfs=rootfs, **stdio),
            metadata=MD, timeout=timeout).pid

    def run(self, id: str, args: list[str], **stdio) -> int:
        self.container(id, args)
        pid = self.create_task(id, **stdio)
        self.tasks.Start(tasks_pb2.StartRequest(container_id=id), metadata=MD)
        return pid

    def cleanup(self):
        for id in self.created:
            try:
                self.tasks.Kill(tasks_pb2.KillRequest(container_id=id, signal=9, all=True),
                                metadata=MD, timeout=10)
            except grpc.RpcError:
                pass
            for _ in range(50):
                try:
                    self.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id=id), metadata=MD,
                                      timeout=10)
                    break
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        break
                    time.sleep(0.1)
            try:
                self.containers.Delete(containers_pb2.DeleteContainerRequest(id=id), metadata=MD)
            except grpc.RpcError:
                pass
        self.channel.close()


def _process_id(message) -> str | None:
    if isinstance(message, task_events.TaskExit):
        return message.id
    return getattr(message, "exec_id", None)


@pytest.fixture
def client(daemon, rootfs):
    c = Client(daemon, rootfs)
    yield c
    c.cleanup()


# runtimed with ShimClient.call wrapped: each call that goes to a shim is written to the
# file named first ("<method> <exec id>"), then made as usual
RECORDING_RUNTIMED = """
import sys
from runtimed import daemon
from runtimed.runtime.shim import ShimClient

record, call = open(sys.argv[1], "a", buffering=1), ShimClient.call

async def recorded(self, method, request, timeout=None):
    record.write(f"{method} {getattr(request, 'exec_id', '')}\\n")
    return await call(self, method, request, timeout)

ShimClient.call = recorded
sys.exit(daemon.main(sys.argv[2:]))
"""


@pytest.fixture
def shim_calls(client, daemon, monkeypatch):
    """The daemon under test restarted with every call it makes to a shim recorded; a
    function that returns those calls so far, as (method, exec id)."""
    calls = daemon.base / "shim-calls"
    command = DaemonProcess.command.fget

    def recording(self) -> list[str]:
        argv = command(self)
        return [sys.executable, "-c", RECORDING_RUNTIMED, str(calls),
                *argv[argv.index("runtimed.daemon") + 1:]]

    monkeypatch.setattr(DaemonProcess, "command", property(recording))
    client.channel.close()
    daemon.restart()
    client.connect()
    return lambda: [tuple(line.split(" ")) for line in calls.read_text().splitlines()]


class Collector:
    """Subscribes to /tasks/ events in a thread."""

    def __init__(self, client):
        self.events = []
        self.stream = client.events.Subscribe(
            events_pb2.SubscribeRequest(filters=['topic~="^/tasks/"']))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(0.3)

    def _run(self):
        try:
            for envelope in self.stream:
                self.events.append(envelope)
        except grpc.RpcError:
            pass

    def topics(self, id: str, exec_id: str | None = None) -> list[str]:
        """Topics of `id`'s events; with `exec_id`, only those naming that process."""
        found = []
        for e in self.events:
            message = getattr(task_events, e.event.type_url.rsplit(".", 1)[-1])()
            message.ParseFromString(e.event.value)
            if message.container_id != id:
                continue
            if exec_id is not None and _process_id(message) not in (exec_id, None):
                continue
            found.append(e.topic)
        return found

    def wait_for(self, id: str, topic: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if topic in self.topics(id):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {topic} for {id}; got {self.topics(id)}")

    def close(self):
        self.stream.cancel()


def test_run_output_exit_code_and_events(client, tmp_path):
    events = Collector(client)
    out = tmp_path / "out"
    os.mkfifo(out)
    rout = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    client.run("t1", ["sh", "-c", "echo hi; exit 3"], stdout=str(out))
    waited = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="t1"), metadata=MD, timeout=30)
    assert waited.exit_status == 3
    assert read_until_eof(rout) == b"hi\n"
    got = client.tasks.Get(tasks_pb2.GetRequest(container_id="t1"), metadata=MD).process
    assert got.status == task_pb2.STOPPED and got.exit_status == 3
    deleted = client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="t1"), metadata=MD)
    assert deleted.exit_status == 3
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Get(tasks_pb2.GetRequest(container_id="t1"), metadata=MD)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    events.wait_for("t1", "/tasks/delete")
    assert events.topics("t1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    events.close()
    os.close(rout)
    assert not (client.daemon.state / "tasks" / "tt" / "t1").exists()


def test_exec_pause_pids_and_list(client, tmp_path):
    spec = client.container("t2", ["sleep", "1000"])
    client.create_task("t2")
    waiter = client.tasks.Wait.future(tasks_pb2.WaitRequest(container_id="t2"), metadata=MD,
                                      timeout=60)  # before Start
    client.tasks.Start(tasks_pb2.StartRequest(container_id="t2"), metadata=MD)
    listed = client.tasks.List(tasks_pb2.ListTasksRequest(), metadata=MD).tasks
    assert [(t.id, t.status) for t in listed] == [("t2", task_pb2.RUNNING)]

    out = tmp_path / "exec.out"
    os.mkfifo(out)
    rout = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    process = dict(spec["process"], args=["sh", "-c", "echo from exec; exit 4"])
    request = tasks_pb2.ExecProcessRequest(container_id="t2", exec_id="e1", stdout=str(out))
    request.spec.type_url = PROCESS_URL
    request.spec.value = json.dumps(process).encode()
    client.tasks.Exec(request, metadata=MD)
    client.tasks.Start(tasks_pb2.StartRequest(container_id="t2", exec_id="e1"), metadata=MD)
    done = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="t2", exec_id="e1"), metadata=MD,
                             timeout=30)
    assert done.exit_status == 4
    assert read_until_eof(rout) == b"from exec\n"
    client.tasks.DeleteProcess(tasks_pb2.DeleteProcessRequest(container_id="t2", exec_id="e1"),
                               metadata=MD)

    client.container("t2stopped", ["true"])
    client.create_task("t2stopped")  # created, not running: it reports no metrics
    metrics = client.tasks.Metrics(tasks_pb2.MetricsRequest(), metadata=MD).metrics
    assert [m.id for m in metrics] == ["t2"]
    assert metrics[0].data.type_url.startswith("io.containerd.cgroups.v")
    only = client.tasks.Metrics(tasks_pb2.MetricsRequest(filters=["id==t2stopped"]), metadata=MD)
    assert list(only.metrics) == []
    listed = client.tasks.List(tasks_pb2.ListTasksRequest(), metadata=MD).tasks
    assert sorted((t.id, t.status) for t in listed) == [
        ("t2", task_pb2.RUNNING), ("t2stopped", task_pb2.CREATED)]
    for expression, ids in (("status==running", ["t2"]), ("id==t2stopped", ["t2stopped"]),
                            ("status==running,id==t2stopped", [])):
        request = tasks_pb2.ListTasksRequest(filter=expression)
        assert [t.id for t in client.tasks.List(request, metadata=MD).tasks] == ids, expression
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.List(tasks_pb2.ListTasksRequest(filter="status=="), metadata=MD)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    pids = client.tasks.ListPids(tasks_pb2.ListPidsRequest(container_id="t2"), metadata=MD)
    assert len(pids.processes) == 1
    client.tasks.Pause(tasks_pb2.PauseTaskRequest(container_id="t2"), metadata=MD)
    got = client.tasks.Get(tasks_pb2.GetRequest(container_id="t2"), metadata=MD).process
    assert got.status == task_pb2.PAUSED
    client.tasks.Resume(tasks_pb2.ResumeTaskRequest(container_id="t2"), metadata=MD)
    assert not waiter.done()
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="t2"), metadata=MD)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.tasks.Kill(tasks_pb2.KillRequest(container_id="t2", signal=signal.SIGKILL),
                      metadata=MD)
    assert waiter.result().exit_status == 137
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Checkpoint(tasks_pb2.CheckpointTaskRequest(container_id="t2"), metadata=MD)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    os.close(rout)


def test_restart_recovers_tasks_and_exit_statuses(client, daemon):
    spec = client.container("keep", ["sleep", "1000"])
    client.create_task("keep")
    client.tasks.Start(tasks_pb2.StartRequest(container_id="keep"), metadata=MD)
    client.run("quick", ["sh", "-c", "sleep 1.5; exit 5"])
    client.channel.close()
    daemon.kill9()
    time.sleep(2.5)  # "quick" exits while runtimed is down
    daemon.start()
    client.connect()
    listed = {t.id: t for t in client.tasks.List(tasks_pb2.ListTasksRequest(), metadata=MD).tasks}
    assert listed["keep"].status == task_pb2.RUNNING
    assert listed["quick"].status == task_pb2.STOPPED and listed["quick"].exit_status == 5
    waited = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="quick"), metadata=MD,
                               timeout=10)
    assert waited.exit_status == 5
    # the exit that happened while runtimed was down has been published, once
    bundle = daemon.state / "tasks" / "tt" / "quick"
    for _ in range(50):
        if json.loads((bundle / "runtimed.json").read_text()).get("init_exit"):
            break
        time.sleep(0.1)
    assert json.loads((bundle / "runtimed.json").read_text())["init_exit"] is True
    # exec into the survivor works
    request = tasks_pb2.ExecProcessRequest(container_id="keep", exec_id="after")
    request.spec.type_url = PROCESS_URL
    request.spec.value = json.dumps(dict(spec["process"], args=["true"])).encode()
    client.tasks.Exec(request, metadata=MD)
    client.tasks.Start(tasks_pb2.StartRequest(container_id="keep", exec_id="after"), metadata=MD)
    done = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="keep", exec_id="after"),
                             metadata=MD, timeout=30)
    assert done.exit_status == 0
    # a subscriber now sees a later exit exactly once, and no replay of the old one
    events = Collector(client)
    client.tasks.Kill(tasks_pb2.KillRequest(container_id="keep", signal=9), metadata=MD)
    events.wait_for("keep", "/tasks/exit")
    time.sleep(0.5)
    assert events.topics("keep", exec_id="keep").count("/tasks/exit") == 1, events.events
    assert events.topics("quick") == []
    events.close()


@pytest.mark.parametrize("binary", ["runc", ""], ids=["runc", "builtin"])
def test_dead_shim_is_cleaned_up_with_exit_255(client, daemon, binary):
    """The shim killed: a 255 exit, the task and bundle gone, and the container too, its
    cgroup included: the runtime's `delete --force` on the root the shim's runtime used
    (runc's `runtime/`; the bundle itself for an init the built-in runtime's shim forked)."""
    client.container("victim", ["sleep", "1000"], binary=binary)
    init_pid = client.create_task("victim")
    client.tasks.Start(tasks_pb2.StartRequest(container_id="victim"), metadata=MD)
    cgroup = Path("/sys/fs/cgroup/pids") / next(
        line.split(":", 2)[2].strip("/\n") for line in open(f"/proc/{init_pid}/cgroup")
        if line.split(":")[1] == "pids")
    assert cgroup.is_dir()
    events = Collector(client)
    bundle = daemon.state / "tasks" / "tt" / "victim"
    shim_pid = int((bundle / "shim.pid").read_text())
    os.kill(shim_pid, signal.SIGKILL)
    events.wait_for("victim", "/tasks/exit")
    exit_event = [e for e in events.events if e.topic == "/tasks/exit"][0]
    message = task_events.TaskExit()
    message.ParseFromString(exit_event.event.value)
    assert message.exit_status == 255
    assert message.pid == init_pid  # as its /tasks/create said (kept in runtimed's record)
    for _ in range(100):
        if not bundle.exists():
            break
        time.sleep(0.05)
    assert not bundle.exists()
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Get(tasks_pb2.GetRequest(container_id="victim"), metadata=MD)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for _ in range(100):
        if not os.path.exists(f"/proc/{init_pid}") and not cgroup.exists():
            break
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{init_pid}")  # the container went with it
    assert not cgroup.exists()
    events.close()


def test_a_pending_wait_answers_255_when_the_shim_dies(shim_calls, client, daemon):
    """Wait on the init is answered from the relayed exit, never by a Wait call held open
    on the shim: when the shim is killed under it, the relay's cleanup reports 255."""
    client.run("orphan", ["sleep", "1000"])
    shim_pid = int((daemon.state / "tasks" / "tt" / "orphan" / "shim.pid").read_text())
    waits = [client.tasks.Wait.future(tasks_pb2.WaitRequest(container_id="orphan"),
                                      metadata=MD, timeout=30) for _ in range(3)]
    time.sleep(0.2)
    assert not any(w.done() for w in waits)
    os.kill(shim_pid, signal.SIGKILL)
    assert {w.result().exit_status for w in waits} == {255}
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Wait(tasks_pb2.WaitRequest(container_id="orphan"), metadata=MD, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("Wait", "") not in shim_calls()


def test_a_wait_on_a_created_task_is_answered_when_the_task_is_deleted(shim_calls, client):
    """A Wait pending on an init that never started ends with the delete: answered from
    the relay with the status of the init the delete killed (not left hanging on the
    relay, nor asked of the shim)."""
    client.container("unstarted", ["true"])
    client.create_task("unstarted")
    waiting = client.tasks.Wait.future(tasks_pb2.WaitRequest(container_id="unstarted"),
                                       metadata=MD, timeout=30)
    time.sleep(0.2)
    assert not waiting.done()
    client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="unstarted"), metadata=MD,
                        timeout=10)
    assert waiting.result().exit_status == 137  # the created init, killed by the delete
    assert ("Delete", "") in shim_calls() and ("Wait", "") not in shim_calls()


def test_a_deleted_tasks_shim_exits_without_a_shutdown_call(shim_calls, client, daemon):
    """The init's Delete asks the shim to exit once it has answered: no Shutdown call,
    and the shim (keeper and worker) is gone soon after, its bundle with it."""
    client.run("brief", ["true"])
    client.tasks.Wait(tasks_pb2.WaitRequest(container_id="brief"), metadata=MD, timeout=30)
    bundle = daemon.state / "tasks" / "tt" / "brief"
    shim = int((bundle / "shim.pid").read_text())
    client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="brief"), metadata=MD,
                        timeout=10)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{shim}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{shim}") and not bundle.exists()
    assert ("Delete", "") in shim_calls() and ("Shutdown", "") not in shim_calls()


def test_many_waits_and_subscribers_do_not_slow_other_calls(shim_calls, client):
    """100 pending Waits and 10 subscribers leave Get's latency alone; the Waits are no
    calls held open on the shim (the relayed exit answers them all)."""
    client.run("busy", ["sleep", "1000"])

    def get_latency() -> float:
        samples = []
        for _ in range(10):
            start = time.monotonic()
            client.tasks.Get(tasks_pb2.GetRequest(container_id="busy"), metadata=MD, timeout=10)
            samples.append(time.monotonic() - start)
        return sorted(samples)[len(samples) // 2]

    idle = get_latency()
    waits = [client.tasks.Wait.future(tasks_pb2.WaitRequest(container_id="busy"), metadata=MD,
                                      timeout=120) for _ in range(100)]
    subscribers = [Collector(client) for _ in range(10)]
    loaded = get_latency()
    assert loaded < max(5 * idle, 0.05), (idle, loaded)
    assert not any(w.done() for w in waits)
    client.tasks.Kill(tasks_pb2.KillRequest(container_id="busy", signal=9), metadata=MD)
    assert {w.result().exit_status for w in waits} == {137}
    for subscriber in subscribers:
        subscriber.wait_for("busy", "/tasks/exit")
        assert subscriber.topics("busy", exec_id="busy").count("/tasks/exit") == 1
        subscriber.close()
    assert ("Wait", "") not in shim_calls()


def _ppid(pid: str) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _zygote_pids(daemon) -> list[int]:
    """The zygote: runs `shimd.zygote` for this daemon and is not one of its shims."""
    marker = str(daemon.state / "shim-zygote.sock").encode()
    shims = {int(p.read_text()) for p in daemon.state.glob("tasks/*/*/shim.pid")}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in shims:
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            shim = open(f"/proc/{entry}/comm").read().strip().startswith(("shimd-", "shimw-"))
            if (b"shimd.zygote" in cmdline and marker in cmdline and _ppid(entry) not in shims
                    and not shim):  # (a spare shim and workers carry its command line too)
                found.append(int(entry))
    return found


def test_kill9_of_the_shim_starter_leaves_container_and_shim_working(client, daemon):
    client.run("z1", ["sleep", "1000"])
    starters = _zygote_pids(daemon)
    assert len(starters) == 1
    os.kill(starters[0], signal.SIGKILL)
    time.sleep(0.3)
    got = client.tasks.Get(tasks_pb2.GetRequest(container_id="z1"), metadata=MD).process
    assert got.status == task_pb2.RUNNING  # the shim answers; the container runs
    request = tasks_pb2.UpdateTaskRequest(container_id="z1")
    request.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    request.resources.value = json.dumps({"memory": {"limit": 64 << 20}}).encode()
    client.tasks.Update(request, metadata=MD)
    cgroup = [line.split(":", 2)[2].strip() for line in open(f"/proc/{got.pid}/cgroup")
              if ":memory:" in line][0]
    limit = open(f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes").read()
    assert int(limit) == 64 << 20
    client.tasks.Kill(tasks_pb2.KillRequest(container_id="z1", signal=15), metadata=MD)
    client.tasks.Kill(tasks_pb2.KillRequest(container_id="z1", signal=9), metadata=MD)
    waited = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="z1"), metadata=MD, timeout=30)
    assert waited.exit_status == 137
    client.run("z2", ["true"])  # a new zygote comes up for the next container
    assert client.tasks.Wait(tasks_pb2.WaitRequest(container_id="z2"), metadata=MD,
                             timeout=30).exit_status == 0


@pytest.mark.parametrize("shutdown", [False, True], ids=["shim-waits", "shim-exits"])
def test_a_delete_interrupted_by_a_crash_is_finished_on_restart(client, daemon, shutdown):
    """runtimed killed after the shim's Delete answered: the restart finds the shim still
    waiting for its Shutdown, or (told by the Delete, as runtimed's own is) gone, and
    finishes the removal either way."""
    client.run("gone", ["true"])
    client.tasks.Wait(tasks_pb2.WaitRequest(container_id="gone"), metadata=MD, timeout=30)
    bundle = daemon.state / "tasks" / "tt" / "gone"
    address = (bundle / "address").read_text()
    shim_pid = int((bundle / "shim.pid").read_text())
    client.channel.close()
    daemon.kill9()
    # what runtimed's Delete does first, then it "crashes" before the cleanup
    channel = grpc.insecure_channel(address)
    from runtimed.api.shim.v1 import shim_pb2, shim_pb2_grpc

    answer = shim_pb2_grpc.ShimStub(channel).Delete(
        shim_pb2.DeleteRequest(id="gone", shutdown=shutdown), timeout=30)
    assert answer.shutting_down == shutdown
    channel.close()
    if shutdown:  # gone once its caller hung up
        for _ in range(100):
            if not os.path.exists(f"/proc/{shim_pid}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{shim_pid}")
    daemon.start()
    client.connect()
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Get(tasks_pb2.GetRequest(container_id="gone"), metadata=MD)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not bundle.exists()
    for _ in range(100):
        if not os.path.exists(f"/proc/{shim_pid}"):
            break
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{shim_pid}")


def test_shim_that_died_while_runtimed_was_down_is_cleaned_up_on_restart(client, daemon):
    init_pid = client.run("lost", ["sleep", "1000"])
    bundle = daemon.state / "tasks" / "tt" / "lost"
    shim_pid = int((bundle / "shim.pid").read_text())
    client.channel.close()
    daemon.kill9()
    os.kill(shim_pid, signal.SIGKILL)
    time.sleep(0.3)
    daemon.start()
    client.connect()
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Get(tasks_pb2.GetRequest(container_id="lost"), metadata=MD)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not bundle.exists()
    for _ in range(100):
        if not os.path.exists(f"/proc/{init_pid}"):
            break
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{init_pid}")  # the orphaned container was removed
    client.create_task("lost")  # the container record is intact: it runs again
    client.tasks.Start(tasks_pb2.StartRequest(container_id="lost"), metadata=MD)
    client.tasks.Kill(tasks_pb2.KillRequest(container_id="lost", signal=9), metadata=MD)
    assert client.tasks.Wait(tasks_pb2.WaitRequest(container_id="lost"), metadata=MD,
                             timeout=30).exit_status == 137


# a createRuntime hook that stops the shim running the create (from the bundle's shim.pid,
# written to argv[1] too) and fails it: the shim answers nothing until it is killed
STOP_THE_SHIM = """
import json, os, signal, sys
pid = int(open(os.path.join(json.load(sys.stdin)["bundle"], "shim.pid")).read())
open(sys.argv[1], "w").write(str(pid))
children = open(f"/proc/{pid}/task/{pid}/children").read().split()
if sys.argv[2] == "shim":  # its worker too, which serves Create (shimd/keeper.py)
    for c in children:
        if open(f"/proc/{c}/comm").read().startswith("shimw-"):
            os.kill(int(c), signal.SIGSTOP)
os.kill(pid, signal.SIGSTOP)
sys.exit(1)
"""


def _create_with_a_stopped_shim(client, tmp_path, stopped: str) -> int:
    """A create of "stuck" whose createRuntime hook stops its shim ("shim": the keeper and
    the worker serving Create) or the keeper alone, then fails; the keeper's pid."""
    out = tmp_path / "shim-pid"

    def hook(spec):
        spec["hooks"] = {"createRuntime": [{"path": sys.executable, "args": [
            sys.executable, "-c", STOP_THE_SHIM, str(out), stopped]}]}

    client.container("stuck", ["true"], edit=hook)
    with pytest.raises(grpc.RpcError):
        client.create_task("stuck", timeout=3)
    return int(out.read_text())


@pytest.mark.parametrize("stopped", ["shim", "keeper"])
def test_a_failed_create_removes_the_bundle_only_once_its_shim_is_gone(client, daemon,
                                                                         tmp_path, stopped):
    """Create's error path shuts the shim down and waits until its process is gone (killed
    when it does not go) before the bundle is removed: a shim still running writes there
    (outbox, init.pid). Here the shim stops answering in the middle of Create ("shim"),
    or only its keeper stops, so Create fails at once and the client's deadline comes
    while runtimed waits for the keeper to go (the cleanup used to be cut short then)."""
    bundle = daemon.state / "tasks" / "tt" / "stuck"
    pid = _create_with_a_stopped_shim(client, tmp_path, stopped)
    try:
        for _ in range(600):
            if not bundle.exists():
                break
            time.sleep(0.05)
        assert not bundle.exists()
        assert not _alive(pid)  # gone before its bundle was
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)


def test_a_create_cancelled_while_the_previous_shim_exits_leaves_that_shims_bundle(
        client, daemon, tmp_path):
    """A create that waits for the removal of a failed create's shim (the keeper stopped,
    as above) and is cancelled meanwhile (its deadline) made nothing, so it discards
    nothing: the bundle stays while that shim lives (it ran `runtime delete --force` and
    removed the bundle under it, and replaced the pending removal with its own)."""
    bundle = daemon.state / "tasks" / "tt" / "stuck"
    pid = _create_with_a_stopped_shim(client, tmp_path, "keeper")
    try:
        for _ in range(40):  # until runtimed has seen the first create's caller go
            with pytest.raises(grpc.RpcError) as info:
                client.create_task("stuck", timeout=1)
            if info.value.code() != grpc.StatusCode.ALREADY_EXISTS:
                break
            time.sleep(0.05)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _alive(pid)  # the first create's removal still waits for it
        for _ in range(600):
            alive = _alive(pid)
            assert bundle.exists() or not alive
            if not alive:
                break
            time.sleep(0.01)
        assert not _alive(pid)
        for _ in range(600):
            if not bundle.exists():
                break
            time.sleep(0.05)
        assert not bundle.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_dispose_never_kills_a_process_that_got_the_shims_pid(tmp_path):
    """A shim known by its pid (from Connect) that is gone by the time it is disposed of:
    the number may be another process's by then, which is not killed (nor waited for)."""
    import asyncio

    from runtimed.runtime.shim import ShimClient, ShimManager

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    other = subprocess.Popen(["sleep", "1000"], cwd=tmp_path)  # the pid's new owner
    try:
        async def dispose():
            client = ShimClient("gone", f"unix://{tmp_path}/no.sock", bundle)
            client.pid = other.pid
            await ShimManager(tmp_path / "state").dispose(client, exit_timeout=0.1)

        asyncio.run(dispose())
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


class _RecordedExchange:
    def __init__(self):
        self.topics: list[tuple[str, str]] = []  # (container id, topic)
        self.pids: list[int] = []  # of each event, in the same order

    def forward(self, event):
        self.topics.append((event.message.container_id, event.topic))
        self.pids.append(event.message.pid)

    def publish(self, namespace, topic, message):
        self.topics.append((message.container_id, topic))
        self.pids.append(message.pid)


def test_a_shim_killed_while_its_init_sets_up_leaves_no_exit_on_restart(tmp_path):
    """runtimed and the shim both killed while the init sets up: the restart publishes no
    /tasks/exit for a task whose create was never reported; once the create is in the
    outbox, create then 255, with the pid the create reported (a shim of a runtime's command
    line, or from before session 12, also left `init.pid`: the same pid)."""
    import asyncio

    from runtimed.runtime.tasks import TaskManager

    state = tmp_path / "state"
    for id, outbox in (("setup", b""), ("made", json.dumps(
            {"seq": 1, "topic": "/tasks/create", "timestamp": time.time(), "id": "made",
             "pid": 4242}).encode() + b"\n")):
        bundle = state / "tasks" / "tt" / id
        bundle.mkdir(parents=True)
        (bundle / "runtimed.json").write_text(json.dumps(
            {"namespace": "tt", "id": id, "runtime": "", "rootfs_mounted": False}))
        (bundle / "init.pid").write_text("4242")
        (bundle / "events.jsonl").write_bytes(outbox)  # the shim makes it empty early too
    exchange = _RecordedExchange()

    async def restart():
        await TaskManager(state, None, exchange).load()

    asyncio.run(restart())
    assert exchange.topics == [("made", "/tasks/create"), ("made", "/tasks/exit")]
    assert exchange.pids == [4242, 4242]
    assert not (state / "tasks" / "tt").exists()  # both cleaned up


def _private_mb(pid: int) -> float:
    kb = 0
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kb += int(line.split()[1])
    return kb / 1024


def test_idle_shims_from_the_zygote_stay_small(client, daemon):
    """Guards the zygote's and the keeper's savings (docs/shim.md: an idle shim is its
    keeper alone, ~2.4 MB private, against ~6 MB for a shim that serves and ~19 MB for one
    started as its own Python process)."""
    keepers = []
    for i in range(3):
        client.run(f"idle{i}", ["sleep", "1000"])
        keepers.append(int((daemon.state / "tasks" / "tt" / f"idle{i}" / "shim.pid").read_text()))

    def workers() -> list[str]:
        return [c for k in keepers for c in open(f"/proc/{k}/task/{k}/children").read().split()
                if open(f"/proc/{c}/comm").read().startswith("shimw-")]

    for _ in range(200):  # runtimed hangs up after 2 s, a worker retires 1 s later
        if not workers():
            break
        time.sleep(0.05)
    assert not workers()
    sizes = [_private_mb(pid) for pid in keepers]
    assert max(sizes) < 4, sizes


# A stand-in for a shim that is still exiting after Delete answered: its pid is in the
# bundle's shim.pid and its working directory is the bundle, and it creates files there as
# fast as it can until SIGTERM (the real shim's late writes are rare and cannot be timed).
LATE_WRITER = """
import os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
n = 0
while True:
    try:
        with open(f"late-{n % 50}", "w") as f:
            f.write("x")
        n += 1
        if n == 1:
            print("writing", flush=True)
    except OSError:
        pass
"""


def _stand_in_shim(bundle) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-S", "-c", LATE_WRITER], cwd=bundle,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    tmp = bundle / ".shim.pid.test"
    tmp.write_text(str(writer.pid))
    os.replace(tmp, bundle / "shim.pid")
    return writer


def _wait_gone(pid: int) -> None:
    for _ in range(200):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still there")


def test_what_a_shim_writes_until_it_exits_leaves_no_bundle_behind(client, daemon):
    """Issue 11: a clean delete removed the bundle while its shim was still exiting, and a
    file the shim wrote meanwhile kept the directory (1 in 1,000 lifecycles under load).
    The bundle's files are now removed once the shim process has exited."""
    client.run("late", ["true"])
    client.tasks.Wait(tasks_pb2.WaitRequest(container_id="late"), metadata=MD, timeout=30)
    bundle = daemon.state / "tasks" / "tt" / "late"
    real_shim = int((bundle / "shim.pid").read_text())
    writer = _stand_in_shim(bundle)
    try:
        client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="late"), metadata=MD,
                            timeout=30)
        assert not bundle.exists()  # gone from the task tree when Delete answers
        time.sleep(0.3)
        assert writer.poll() is None  # still writing into its (moved) directory
        assert any(os.scandir(f"/proc/{writer.pid}/cwd"))
    finally:
        writer.terminate()
        writer.wait()
    _wait_gone(real_shim)
    for _ in range(200):
        left = list((daemon.state / "trash").glob("*")) + list(bundle.parent.glob("*"))
        if not left:
            break
        time.sleep(0.05)
    assert not left
    # the id is free again at once
    client.create_task("late")
    client.tasks.Start(tasks_pb2.StartRequest(container_id="late"), metadata=MD)
    assert client.tasks.Wait(tasks_pb2.WaitRequest(container_id="late"), metadata=MD,
                             timeout=30).exit_status == 0


def test_restart_finishes_the_removals_a_crash_interrupted(client, daemon):
    client.run("pend", ["true"])
    client.tasks.Wait(tasks_pb2.WaitRequest(container_id="pend"), metadata=MD, timeout=30)
    bundle = daemon.state / "tasks" / "tt" / "pend"
    real_shim = int((bundle / "shim.pid").read_text())
    writer = _stand_in_shim(bundle)
    try:
        client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="pend"), metadata=MD,
                            timeout=30)
        _wait_gone(real_shim)
        assert len(list((daemon.state / "trash").iterdir())) == 1  # waiting for the writer
        client.channel.close()
        daemon.kill9()
        daemon.start()
        client.connect()
        assert writer.wait(timeout=10) == -signal.SIGKILL  # the lingering "shim" is killed
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert not (daemon.state / "trash").exists()
    assert not bundle.exists()


def test_what_is_published_is_recorded_for_the_shim_to_trim(client, daemon):
    """runtimed sends no Acks: it records the last event it published in its record of
    the bundle, from which the shim trims its outbox (so the outbox does not keep every
    event). One file: the published part had one of its own until session 13."""
    pid = client.run("acked", ["sleep", "1000"])
    record = daemon.state / "tasks" / "tt" / "acked" / "runtimed.json"
    for _ in range(100):
        if json.loads(record.read_text())["seq"] >= 2:
            break
        time.sleep(0.05)
    # /tasks/create, /tasks/start; and the init's pid, for an exit runtimed reports itself
    data = json.loads(record.read_text())
    assert (data["namespace"], data["id"]) == ("tt", "acked")  # what cleans up without the shim
    assert {k: data[k] for k in ("seq", "init_exit", "pid")} == {
        "seq": 2, "init_exit": False, "pid": pid}
    assert not record.with_name("published").exists()
    # written through one fd while the relay runs, closed once the task is gone
    assert open_fds_on(daemon.proc.pid, "/acked/runtimed.json") == 1
    client.tasks.Kill(tasks_pb2.KillRequest(container_id="acked", signal=9), metadata=MD)
    client.tasks.Wait(tasks_pb2.WaitRequest(container_id="acked"), metadata=MD, timeout=30)
    client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="acked"), metadata=MD)
    for _ in range(200):
        if not open_fds_on(daemon.proc.pid, "/runtimed.json"):
            break
        time.sleep(0.05)
    assert open_fds_on(daemon.proc.pid, "/runtimed.json") == 0


def open_fds_on(pid: int, path: str) -> int:
    """How many of `pid`'s fds name a file whose path has `path` in it (moved or not)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += path in os.readlink(f"/proc/{pid}/fd/{fd}")
    return count


def test_a_stopped_task_is_reported_without_asking_its_shim(client, daemon):
    """Once init's exit is relayed it is final: Get and Wait answer from it (no shim call,
    one round trip fewer for every `ctl rm`), even while the shim cannot answer."""
    events = Collector(client)
    client.run("done", ["sh", "-c", "exit 7"])
    events.wait_for("done", "/tasks/exit")
    shim = int((daemon.state / "tasks" / "tt" / "done" / "shim.pid").read_text())
    os.kill(shim, signal.SIGSTOP)
    try:
        got = client.tasks.Get(tasks_pb2.GetRequest(container_id="done"), metadata=MD,
                               timeout=5).process
        assert (got.status, got.exit_status, got.id) == (task_pb2.STOPPED, 7, "done")
        assert got.exited_at.ToNanoseconds() > 0 and got.pid > 0
        waited = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="done"), metadata=MD,
                                   timeout=5)
        assert waited.exit_status == 7 and waited.exited_at == got.exited_at
    finally:
        os.kill(shim, signal.SIGCONT)
    events.close()
