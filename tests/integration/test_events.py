"""Events over the wire: ctr events sees what happens; Publish and Forward work."""

import subprocess
import time

import grpc
import pytest
from google.protobuf import any_pb2

from runtimed.api.containerd.events import task_pb2
from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc


def test_ctr_events_shows_lifecycle_topics(daemon):
    watcher = subprocess.Popen(
        ["ctr", "-a", daemon.address, "events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.5)  # let the subscription reach the daemon
        daemon.ctr("namespaces", "create", "evt")
        daemon.ctr("namespaces", "rm", "evt")
        time.sleep(0.5)
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
    lines = [line for line in out.splitlines() if "/namespaces/" in line]
    assert "/namespaces/create" in lines[0] and "evt" in lines[0]
    assert "/namespaces/delete" in lines[1]


def test_publish_and_subscribe_with_filters(daemon):
    stub = events_pb2_grpc.EventsStub(daemon.channel())
    stream = stub.Subscribe(events_pb2.SubscribeRequest(filters=['topic=="/tasks/exit",namespace==n1']))
    time.sleep(0.3)
    event = any_pb2.Any()
    event.Pack(task_pb2.TaskExit(container_id="c1", exit_status=3))
    event.type_url = "containerd.events.TaskExit"
    stub.Publish(events_pb2.PublishRequest(topic="/tasks/other", event=event), metadata=[("containerd-namespace", "n1")])
    stub.Publish(events_pb2.PublishRequest(topic="/tasks/exit", event=event), metadata=[("containerd-namespace", "n2")])
    stub.Publish(events_pb2.PublishRequest(topic="/tasks/exit", event=event), metadata=[("containerd-namespace", "n1")])
    envelope = next(stream)
    stream.cancel()
    assert (envelope.namespace, envelope.topic) == ("n1", "/tasks/exit")
    assert envelope.event.type_url == "containerd.events.TaskExit"
    decoded = task_pb2.TaskExit()
    decoded.ParseFromString(envelope.event.value)
    assert decoded.exit_status == 3


def test_publish_without_event_is_invalid_argument(daemon):
    stub = events_pb2_grpc.EventsStub(daemon.channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.Publish(events_pb2.PublishRequest(topic="/x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_dropped_event_counter_is_visible(daemon):
    daemon.ctr("namespaces", "create", "counted")
    out = daemon.ctr("plugins", "ls", "-d", "id==exchange").stdout
    exports = dict(line.split() for line in out.splitlines()
                   if line.strip().split()[:1] in (["dropped"], ["published"]))
    assert exports["dropped"] == "0"
    assert int(exports["published"]) >= 1  # the namespace event


def _exit_event(pid: int, size: int = 1) -> events_pb2.PublishRequest:
    request = events_pb2.PublishRequest(topic="/tasks/exit")
    request.event.type_url = "containerd.events.TaskExit"
    request.event.value = task_pb2.TaskExit(container_id="c" * size, pid=pid).SerializeToString()
    return request


def test_every_subscriber_gets_every_envelope_whole_and_in_order(daemon):
    """Envelopes are encoded once per event and written as bytes to every stream."""
    stub = events_pb2_grpc.EventsStub(daemon.channel())
    streams = [stub.Subscribe(events_pb2.SubscribeRequest(filters=['namespace==ordered']))
               for _ in range(3)]
    time.sleep(0.3)
    before = time.time_ns()
    for pid in range(200):
        stub.Publish(_exit_event(pid), metadata=[("containerd-namespace", "ordered")])
    for stream in streams:
        pids = []
        for envelope in stream:
            assert (envelope.namespace, envelope.topic) == ("ordered", "/tasks/exit")
            assert envelope.event.type_url == "containerd.events.TaskExit"
            assert before <= envelope.timestamp.ToNanoseconds() <= time.time_ns()
            decoded = task_pb2.TaskExit()
            decoded.ParseFromString(envelope.event.value)
            pids.append(decoded.pid)
            if len(pids) == 200:
                break
        stream.cancel()
        assert pids == list(range(200))


def test_a_subscriber_that_does_not_read_is_told_it_fell_behind(daemon):
    """Its queue (4096) overflows: the events before the overflow arrive in order, then
    RESOURCE_EXHAUSTED; a subscriber that reads still gets everything."""
    from runtimed.events.exchange import QUEUE_SIZE

    stub = events_pb2_grpc.EventsStub(daemon.channel())
    # its own connection with fixed flow-control windows: the transport holds only a
    # few of these 1 KiB events, the rest wait in the daemon's queue for this subscriber
    small = grpc.insecure_channel(f"unix://{daemon.address}", options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)])
    stuck = events_pb2_grpc.EventsStub(small).Subscribe(
        events_pb2.SubscribeRequest(filters=['namespace==flood']), timeout=120)
    reader = stub.Subscribe(events_pb2.SubscribeRequest(filters=['namespace==flood']))
    got: list[int] = []

    def read():
        try:
            for envelope in reader:
                decoded = task_pb2.TaskExit()
                decoded.ParseFromString(envelope.event.value)
                got.append(decoded.pid)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED  # by the test, at the end

    import threading

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.3)
    stub.Publish(_exit_event(0, 1024), metadata=[("containerd-namespace", "flood")])
    next(stuck)  # the stream is open; from here on it is not read
    total = QUEUE_SIZE + 1000
    for pid in range(1, total):  # one after another: concurrent publishes have no order
        stub.Publish(_exit_event(pid, 1024), metadata=[("containerd-namespace", "flood")])
    deadline = time.monotonic() + 30
    while len(got) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    reader.cancel()
    thread.join(10)
    assert got == list(range(total))
    pids = []
    with pytest.raises(grpc.RpcError) as err:
        for envelope in stuck:
            decoded = task_pb2.TaskExit()
            decoded.ParseFromString(envelope.event.value)
            pids.append(decoded.pid)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "missed" in err.value.details()
    assert pids == list(range(1, len(pids) + 1))  # in order, none skipped before the end
    assert len(pids) < total - 1
    out = daemon.ctr("plugins", "ls", "-d", "id==exchange").stdout
    dropped = dict(line.split() for line in out.splitlines()
                   if line.strip().split()[:1] == ["dropped"])["dropped"]
    assert int(dropped) == total - 1 - len(pids)
