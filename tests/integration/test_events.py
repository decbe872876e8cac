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
