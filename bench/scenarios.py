"""Benchmark scenarios. Each measures one thing the same way on both daemons through
containerd's v1 API (runtimed speaks it), so one client serves for both."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from bench.measure import memory, timed
from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.services.version.v1 import version_pb2_grpc

SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
REPO = Path(__file__).resolve().parent.parent


class Target:
    """One daemon as the scenarios see it: its socket, a warm channel, its pid."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.name = daemon.name
        self.address = daemon.address
        self.channel = grpc.insecure_channel(
            f"unix://{daemon.address}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )

    def md(self, namespace: str) -> list[tuple[str, str]]:
        return [("containerd-namespace", namespace)]

    def close(self) -> None:
        self.channel.close()


@dataclass
class Scenario:
    name: str
    unit: str
    target: str  # the target for the ratio ours / containerd's, e.g. "<= 1.0"
    measure: Callable[[Target], float]
    runs: int = 20
    setup: Callable[[Target], None] | None = None
    teardown: Callable[[Target], None] | None = None
    higher_is_better: bool = False
    tags: set[str] = field(default_factory=set)


# ---- API latency --------------------------------------------------------------------

def version_latency(t: Target, calls: int = 100) -> float:
    stub = version_pb2_grpc.VersionStub(t.channel)
    stub.Version(empty_pb2.Empty())
    return timed(lambda: [stub.Version(empty_pb2.Empty()) for _ in range(calls)]) / calls


def _container(cid: str) -> containers_pb2.Container:
    c = containers_pb2.Container(id=cid)
    c.runtime.name = "io.containerd.runc.v2"
    c.spec.type_url = SPEC_TYPE
    c.spec.value = json.dumps({"ociVersion": "1.0.2", "process": {"args": ["true"]}}).encode()
    return c


def create_containers(t: Target, namespace: str, count: int) -> None:
    stub = containers_pb2_grpc.ContainersStub(t.channel)
    have = len(stub.List(containers_pb2.ListContainersRequest(), metadata=t.md(namespace)).containers)
    for i in range(have, count):
        stub.Create(containers_pb2.CreateContainerRequest(container=_container(f"c{i:05d}")),
                    metadata=t.md(namespace))


def delete_containers(t: Target, namespace: str) -> None:
    stub = containers_pb2_grpc.ContainersStub(t.channel)
    for c in stub.List(containers_pb2.ListContainersRequest(), metadata=t.md(namespace)).containers:
        stub.Delete(containers_pb2.DeleteContainerRequest(id=c.id), metadata=t.md(namespace))


def list_containers(t: Target, namespace: str) -> float:
    stub = containers_pb2_grpc.ContainersStub(t.channel)
    return timed(lambda: stub.List(containers_pb2.ListContainersRequest(), metadata=t.md(namespace)))


def tasks_list(t: Target) -> float:
    stub = tasks_pb2_grpc.TasksStub(t.channel)
    stub.List(tasks_pb2.ListTasksRequest())
    return timed(lambda: [stub.List(tasks_pb2.ListTasksRequest()) for _ in range(100)]) / 100


# ---- command line cold start ----------------------------------------------------------

def cli_cold_start(t: Target, *args: str) -> float:
    if t.name == "runtimed":
        cmd = [str(Path(sys.executable).parent / "ctl"), "--address", t.address, *args]
    else:
        cmd = ["ctr", "-a", t.address, *args]
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))


def daemon_rss(t: Target) -> float:
    return memory(t.daemon.pid)["rss"] / 1e6


def scenarios(quick: bool) -> list[Scenario]:
    big = 1000 if quick else 10000
    return [
        Scenario("API Version, warm channel", "ms", "<= 1.0",
                 lambda t: version_latency(t) * 1e3),
        Scenario("API Tasks.List, warm channel", "ms", "<= 1.0", lambda t: tasks_list(t) * 1e3),
        Scenario("Containers.List at 1,000", "ms", "<= 1.0",
                 lambda t: list_containers(t, "list1k") * 1e3, runs=10,
                 setup=lambda t: create_containers(t, "list1k", 1000),
                 teardown=lambda t: delete_containers(t, "list1k")),
        Scenario(f"Containers.List at {big:,}", "ms", "< 50 ms",
                 lambda t: list_containers(t, "listbig") * 1e3, runs=5,
                 setup=lambda t: create_containers(t, "listbig", big),
                 teardown=lambda t: delete_containers(t, "listbig")),
        Scenario("CLI cold start: version", "ms", "<= 1.0",
                 lambda t: cli_cold_start(t, "version") * 1e3, tags={"cli"}),
        Scenario("daemon RSS (idle)", "MB", "<= 1.0", daemon_rss, runs=1),
    ]
