"""runtimed relays a shim's events from its outbox file (inotify) and learns of its death
from a pidfd: no Events stream, no Ack, no Wait held open on the shim, and a connection to
an idle shim is closed (h2client.IDLE_CLOSE), so the shim can retire its API worker."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import grpc
import pytest

from runtimed.api.containerd.events import task_pb2 as task_events
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2
from runtimed.api.containerd.types.task import task_pb2
from tests.conftest import DaemonProcess
from tests.integration import test_tasks
from tests.integration.test_tasks import MD, PROCESS_URL, Collector

# test_tasks' fixtures: a client of the daemon, a busybox rootfs, its cgroup leak check
client, rootfs, leak_check = test_tasks.client, test_tasks.rootfs, test_tasks.leak_check
cgroup_check = test_tasks.cgroup_check

IDLE_CLOSE = 0.5

# runtimed with h2client's idle close shortened and every request it sends to a shim
# written to the file named first ("<method>"), streams included
RECORDING_RUNTIMED = """
import sys
from runtimed import daemon
from runtimed.runtime import h2client

h2client.IDLE_CLOSE = float(sys.argv[2])
record = open(sys.argv[1], "a", buffering=1)
unary, stream = h2client.Channel.unary, h2client.Channel.stream

def recorded_unary(self, path, body, timeout=None):
    record.write(path.rsplit("/", 1)[-1] + "\\n")
    return unary(self, path, body, timeout)

def recorded_stream(self, path, body):
    record.write(path.rsplit("/", 1)[-1] + "\\n")
    return stream(self, path, body)

h2client.Channel.unary, h2client.Channel.stream = recorded_unary, recorded_stream
if sys.argv[3] == "starved":  # as out of inotify watches and of fds for pidfds
    import errno
    from runtimed.runtime import outboxes, tasks

    def no_watch(self, bundle, callback):
        raise OSError(errno.ENOSPC, "inotify_add_watch: No space left on device")

    outboxes.OutboxWatcher.watch = no_watch
    tasks._shim_pidfd = lambda task: None
elif sys.argv[3] == "low-fd-limit":  # as systemd's default soft limit
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.exit(daemon.main(sys.argv[4:]))
"""


@pytest.fixture
def shim_requests(client, daemon, monkeypatch):
    """The daemon restarted recording its requests to shims; returns them so far."""
    return _restart_recording(client, daemon, monkeypatch, "")


@pytest.fixture
def starved(client, daemon, monkeypatch):
    """As `shim_requests`, with no inotify watch and no pidfd to be had."""
    return _restart_recording(client, daemon, monkeypatch, "starved")


def _restart_recording(client, daemon, monkeypatch, mode: str):
    requests = daemon.base / "shim-requests"
    command = DaemonProcess.command.fget

    def recording(self) -> list[str]:
        argv = command(self)
        return [sys.executable, "-c", RECORDING_RUNTIMED, str(requests), str(IDLE_CLOSE), mode,
                *argv[argv.index("runtimed.daemon") + 1:]]

    monkeypatch.setattr(DaemonProcess, "command", property(recording))
    client.channel.close()
    daemon.restart()
    client.connect()
    return lambda: requests.read_text().splitlines() if requests.exists() else []


def _connections(bundle) -> int:
    """Connected sockets on the shim's listening socket (accepted ones carry its path in
    /proc/net/unix, state 03), whichever of the shim's processes holds them."""
    path = (bundle / "address").read_text().strip().removeprefix("unix://")
    count = 0
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and fields[5] == "03":
                count += 1
    return count


def _wait_until(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def test_events_are_relayed_with_no_call_held_open_on_the_shim(shim_requests, client):
    events = Collector(client)
    client.container("rel", ["sh", "-c", "exit 3"])
    client.create_task("rel")
    waiting = client.tasks.Wait.future(tasks_pb2.WaitRequest(container_id="rel"), metadata=MD,
                                       timeout=30)
    client.tasks.Start(tasks_pb2.StartRequest(container_id="rel"), metadata=MD)
    assert waiting.result().exit_status == 3  # answered from the relayed exit
    client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="rel"), metadata=MD,
                        timeout=30)
    events.wait_for("rel", "/tasks/delete")
    assert events.topics("rel") == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                    "/tasks/delete"]
    events.close()
    sent = shim_requests()
    assert "Create" in sent and "Delete" in sent
    assert not {"Events", "Ack", "Wait"} & set(sent), sent


def _process(spec: dict, args: list[str]) -> bytes:
    return json.dumps(dict(spec["process"], args=args)).encode()


def test_an_idle_shim_has_no_connection_and_its_death_is_seen(shim_requests, client, daemon):
    """After IDLE_CLOSE without calls runtimed holds no connection to the shim; the next
    call dials again; a shim killed while nothing is connected to it is still found dead
    (its pidfd): its exit (255) is published and the task cleaned up."""
    spec = client.container("idle", ["sleep", "1000"])
    client.create_task("idle")
    client.tasks.Start(tasks_pb2.StartRequest(container_id="idle"), metadata=MD)
    bundle = daemon.state / "tasks" / "tt" / "idle"
    _wait_until(lambda: _connections(bundle) == 0, "runtimed's connection to the shim closed")
    got = client.tasks.Get(tasks_pb2.GetRequest(container_id="idle"), metadata=MD, timeout=10)
    assert got.process.status == task_pb2.RUNNING
    assert shim_requests()[-1] == "State"  # asked of the shim, on a new connection
    # an exec's wait is a call to the shim; its exit comes through the relay as well
    events = Collector(client)
    request = tasks_pb2.ExecProcessRequest(container_id="idle", exec_id="x")
    request.spec.type_url = PROCESS_URL
    request.spec.value = _process(spec, ["sh", "-c", "exit 6"])
    client.tasks.Exec(request, metadata=MD)
    client.tasks.Start(tasks_pb2.StartRequest(container_id="idle", exec_id="x"), metadata=MD)
    done = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="idle", exec_id="x"),
                             metadata=MD, timeout=30)
    assert done.exit_status == 6
    events.wait_for("idle", "/tasks/exec-started")
    _wait_until(lambda: "/tasks/exit" in events.topics("idle", exec_id="x"), "exec's exit")

    _wait_until(lambda: _connections(bundle) == 0, "the connection closed again")
    init_pid = got.process.pid
    os.kill(int((bundle / "shim.pid").read_text()), signal.SIGKILL)
    events.wait_for("idle", "/tasks/exit")
    _wait_until(lambda: events.topics("idle", exec_id="idle").count("/tasks/exit") == 1,
                "init's exit")
    exits = []
    for envelope in events.events:
        if envelope.topic == "/tasks/exit":
            message = task_events.TaskExit()
            message.ParseFromString(envelope.event.value)
            exits.append((message.id, message.exit_status))
    assert exits == [("x", 6), ("idle", 255)]
    events.close()
    _wait_until(lambda: not bundle.exists(), "the dead shim's bundle removed")
    with pytest.raises(grpc.RpcError) as info:
        client.tasks.Get(tasks_pb2.GetRequest(container_id="idle"), metadata=MD)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    _wait_until(lambda: not os.path.exists(f"/proc/{init_pid}"), "the container gone")
    assert not {"Events", "Ack"} & set(shim_requests())


def test_without_inotify_or_pidfds_the_relay_polls(starved, client, daemon):
    """Out of inotify watches and fds, the relay reads the outbox and checks the shim
    every POLL: events still come, and a dead shim is still found (not a live one)."""
    events = Collector(client)
    client.container("poll", ["sh", "-c", "exit 4"])
    client.create_task("poll")
    client.tasks.Start(tasks_pb2.StartRequest(container_id="poll"), metadata=MD)
    waited = client.tasks.Wait(tasks_pb2.WaitRequest(container_id="poll"), metadata=MD,
                               timeout=30)
    assert waited.exit_status == 4
    client.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="poll"), metadata=MD,
                        timeout=30)
    events.wait_for("poll", "/tasks/delete")
    assert events.topics("poll") == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                     "/tasks/delete"]
    client.run("lives", ["sleep", "1000"])
    bundle = daemon.state / "tasks" / "tt" / "lives"
    time.sleep(2.5)  # a few polls: a live shim stays
    got = client.tasks.Get(tasks_pb2.GetRequest(container_id="lives"), metadata=MD, timeout=10)
    assert got.process.status == task_pb2.RUNNING
    os.kill(int((bundle / "shim.pid").read_text()), signal.SIGKILL)
    events.wait_for("lives", "/tasks/exit")
    _wait_until(lambda: not bundle.exists(), "the dead shim's bundle removed")
    events.close()
    assert "outbox not watched" in daemon.log_text()


def test_runtimed_raises_its_soft_fd_limit_to_the_hard_one(client, daemon, monkeypatch):
    """One pidfd per task: a soft limit of 1024 (systemd's default) would run out at ~1000
    tasks, so runtimed raises it to the hard limit at start."""
    _restart_recording(client, daemon, monkeypatch, "low-fd-limit")
    with open(f"/proc/{daemon.proc.pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard != "1024", line
