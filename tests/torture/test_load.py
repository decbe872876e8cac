"""Load: container lifecycles through the client library (image snapshot, FIFOs, create,
start, wait, remove) leave runtimed with the fds, threads, mounts and cgroups it had and
memory within a bound; 50 clients at once; 100 waits and 10 subscribers on one task.

CI runs 100 lifecycles; the `slow` variant 1,000."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import empty_pb2

from ctl.client import Client, SpecOptions
from runtimed.api.containerd.events import task_pb2 as task_events
from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.services.version.v1 import version_pb2_grpc
from tests import testimages
from tests.torture import stats
from tests.torture.conftest import namespace_cgroups
from tests.torture.helpers import Footprint, md, shim_pids

IMAGE = testimages.BUSYBOX_NAME
# asyncio's default executor starts its workers lazily, up to min(32, cpus + 4): growth
# within that is not a leak; a thread per lifecycle would be
THREAD_SLACK = min(32, (os.cpu_count() or 1) + 4)


@pytest.fixture
def rd(daemon, ns, busybox_archive):
    daemon.ctr("images", "import", busybox_archive, namespace=ns)
    return daemon


def lifecycle(client: Client, id: str) -> None:
    with client.run(id, IMAGE, SpecOptions(args=["echo", id])) as box:
        status = box.wait(timeout=60)
        output = box.output()
    assert (status.code, output) == (0, f"{id}\n".encode())
    stats.record("lifecycles")


def container_cgroups(ns: str) -> list[str]:
    return [str(child) for parent in namespace_cgroups(ns) for child in parent.iterdir()
            if child.is_dir()]


def settle(daemon, base: Footprint, timeout: float = 10) -> Footprint:
    """The daemon's footprint once it stopped shrinking back towards `base`."""
    deadline = time.monotonic() + timeout
    while True:
        now = Footprint.of(daemon.proc.pid, daemon.base)
        if now.fds <= base.fds or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def run_lifecycles(daemon, ns: str, count: int, rss_bound_kib: int) -> None:
    with Client(daemon.address, namespace=ns) as client:
        for i in range(10):  # warm-up: imports, caches, the shim zygote, thread pools
            lifecycle(client, f"warm{i}")
        time.sleep(0.5)
        before = Footprint.of(daemon.proc.pid, daemon.base)
        started = time.monotonic()
        for i in range(count):
            lifecycle(client, f"lc{i}")
        elapsed = time.monotonic() - started
    after = settle(daemon, before)
    leaks = []
    if after.fds > before.fds:
        leaks.append(f"fds {before.fds} -> {after.fds}")
    if after.threads > before.threads + THREAD_SLACK:
        leaks.append(f"threads {before.threads} -> {after.threads}")
    if after.mounts or before.mounts:
        leaks.append(f"mounts {before.mounts} -> {after.mounts}")
    if after.rss_kib - before.rss_kib > rss_bound_kib:
        leaks.append(f"rss {before.rss_kib} -> {after.rss_kib} KiB")
    cgroups = container_cgroups(ns)
    if cgroups:
        leaks.append(f"cgroups {cgroups[:5]}")
    shims = shim_pids(daemon.state)
    if shims:
        leaks.append(f"shims {sorted(shims)}")
    bundles = sorted((daemon.state / "tasks" / ns).glob("*"))
    if bundles:
        leaks.append(f"{len(bundles)} bundles left, the first holding "
                     f"{sorted(p.name for p in bundles[0].rglob('*'))}")
    stats.record("leaks", len(leaks))
    print(f"{count} lifecycles in {elapsed:.1f}s; {before} -> {after}")
    assert not leaks, leaks


def test_100_lifecycles_leak_nothing(rd, ns):
    run_lifecycles(rd, ns, 100, rss_bound_kib=16 << 10)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_1000_lifecycles_leak_nothing(rd, ns):
    run_lifecycles(rd, ns, 1000, rss_bound_kib=24 << 10)


def test_50_clients_at_once(rd, ns):
    before = Footprint.of(rd.proc.pid, rd.base)

    def client(n: int) -> int:
        calls = 0
        with rd.channel() as channel:
            version = version_pb2_grpc.VersionStub(channel)
            images = images_pb2_grpc.ImagesStub(channel)
            containers = containers_pb2_grpc.ContainersStub(channel)
            tasks = tasks_pb2_grpc.TasksStub(channel)
            content = content_pb2_grpc.ContentStub(channel)
            for _ in range(10):
                version.Version(empty_pb2.Empty(), timeout=60)
                got = images.List(images_pb2.ListImagesRequest(), metadata=md(ns), timeout=60)
                assert [i.name for i in got.images] == [IMAGE]
                containers.List(containers_pb2.ListContainersRequest(), metadata=md(ns),
                                timeout=60)
                tasks.List(tasks_pb2.ListTasksRequest(), metadata=md(ns), timeout=60)
                blobs = [i for r in content.List(content_pb2.ListContentRequest(),
                                                 metadata=md(ns), timeout=60) for i in r.info]
                assert len(blobs) >= 3
                calls += 5
        return calls

    with ThreadPoolExecutor(50) as pool:
        total = sum(pool.map(client, range(50)))
    stats.record("inputs", total)
    assert total == 50 * 50
    after = settle(rd, before)
    assert after.fds <= before.fds + 2, (before, after)  # connections closed with clients


class Subscriber:
    def __init__(self, channel, ns: str):
        self.exits: list[task_events.TaskExit] = []
        self.stream = events_pb2_grpc.EventsStub(channel).Subscribe(
            events_pb2.SubscribeRequest(filters=[f'namespace=={ns},topic=="/tasks/exit"']))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for envelope in self.stream:
                message = task_events.TaskExit()
                message.ParseFromString(envelope.event.value)
                self.exits.append(message)
        except grpc.RpcError:
            pass


def test_100_waits_and_10_subscribers_on_one_task(rd, ns):
    with Client(rd.address, namespace=ns) as client, rd.channel() as channel:
        with client.run("busy", IMAGE, SpecOptions(args=["sleep", "100000"])) as box:
            tasks = tasks_pb2_grpc.TasksStub(channel)
            waits = [tasks.Wait.future(tasks_pb2.WaitRequest(container_id="busy"),
                                       metadata=md(ns), timeout=120) for _ in range(100)]
            subscribers = [Subscriber(channel, ns) for _ in range(10)]
            time.sleep(0.5)
            assert not any(w.done() for w in waits)
            got = tasks.Get(tasks_pb2.GetRequest(container_id="busy"), metadata=md(ns),
                            timeout=5)
            assert got.process.pid > 0
            tasks.Kill(tasks_pb2.KillRequest(container_id="busy", signal=9), metadata=md(ns))
            assert {w.result().exit_status for w in waits} == {137}
            assert box.wait(timeout=30).code == 137
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(s.exits for s in subscribers):
                time.sleep(0.05)
            time.sleep(0.3)
            for s in subscribers:
                s.stream.cancel()
                mine = [e for e in s.exits if e.container_id == "busy" and e.id == "busy"]
                assert len(mine) == 1 and mine[0].exit_status == 137, s.exits
    stats.record("inputs", 110)
