"""Benchmark scenarios. Each measures one thing the same way on both daemons through
containerd's v1 API (runtimed speaks it), so one client serves for both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from bench.measure import machine_used_memory, memory, timed
from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.services.version.v1 import version_pb2_grpc

SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
# the `ctl` console script of this environment (make bench installs it), else the module
_CTL_SCRIPT = Path(sys.executable).parent / "ctl"
CTL = [str(_CTL_SCRIPT)] if _CTL_SCRIPT.exists() else [sys.executable, "-m", "ctl"]
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
    md = t.md("bench")
    stub.List(tasks_pb2.ListTasksRequest(), metadata=md)
    return timed(lambda: [stub.List(tasks_pb2.ListTasksRequest(), metadata=md) for _ in range(100)]) / 100


# ---- command line cold start ----------------------------------------------------------

def cli_cold_start(t: Target, *args: str) -> float:
    if t.name == "runtimed":
        cmd = [*CTL, "--address", t.address, *args]
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
        *container_scenarios(quick),
        *image_scenarios(),
        *event_scenarios(),
        Scenario("CLI cold start: ps", "ms", "< 500 ms", lambda t: cli_cold_start(
            t, *(["ps"] if t.name == "runtimed" else ["containers", "ls"])) * 1e3, tags={"cli"}),
        Scenario("CLI cold start: images", "ms", "< 500 ms", lambda t: cli_cold_start(
            t, *(["images"] if t.name == "runtimed" else ["images", "ls"])) * 1e3, tags={"cli"}),
        Scenario("daemon RSS (after the runs above)", "MB", "<= 1.0", daemon_rss, runs=1),
    ]


# ---- containers ------------------------------------------------------------------------

BUSYBOX = "docker.io/library/busybox:latest"
_counter = iter(range(10**9))


def next_id(prefix: str) -> str:
    """A container id unique on this machine: containerd's runc shims keep their state in
    one place for every containerd (/run/containerd/runc/<namespace>/<id>), so two
    benchmarks at once must not use the same ids."""
    return f"{prefix}{os.getpid()}-{next(_counter)}"


def ensure_busybox(t: Target) -> None:
    """Import (and unpack) the busybox test image with `ctr`, the same way on both daemons."""
    from tests.testimages import build

    if getattr(t, "has_busybox", False):
        return
    archive = build(REPO / ".cache" / "bench-images")["busybox"].archive
    subprocess.run(["ctr", "-a", t.address, "-n", "bench", "images", "import", archive],
                   check=True, capture_output=True)
    t.has_busybox = True


def client(t: Target):
    from ctl.client import Client

    if not hasattr(t, "client"):
        t.client = Client(t.address, "bench")
    return t.client


def lifecycle(t: Target) -> float:
    """create -> start -> wait -> delete of `busybox true` from a warm client."""
    from ctl.client import SpecOptions

    cid = next_id("lc")

    def once():
        with client(t).run(cid, BUSYBOX, SpecOptions(args=["true"])) as running:
            assert running.wait(timeout=30).code == 0

    return timed(once)


def cli_run(t: Target, *options: str) -> float:
    """`ctl run --rm` (docker's default: a bridge network) against `ctr run --rm` (a new
    network namespace with only loopback, which is what `--network none` gives ctl)."""
    if t.name == "runtimed":
        cmd = [*CTL, "--address", t.address, "--namespace",
               "bench", "run", "--rm", "--pull", "never", *options, "busybox", "true"]
    else:
        cmd = ["ctr", "-a", t.address, "-n", "bench", "run", "--rm", BUSYBOX, next_id("cr"), "true"]
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))


class Sleepers:
    """N `sleep` containers kept running for exec and memory scenarios."""

    def __init__(self, t: Target, count: int):
        from ctl.client import SpecOptions

        self.t = t
        self.running = []
        for _ in range(count):
            cm = client(t).run(next_id("sl"), BUSYBOX, SpecOptions(args=["sleep", "100000"]))
            self.running.append((cm, cm.__enter__()))

    def ids(self) -> list[str]:
        return [r.id for _, r in self.running]

    def close(self) -> None:
        for cm, running in self.running:
            client(self.t).tasks.kill(running.id, 9)
            cm.__exit__(None, None, None)
        self.running = []


def start_sleepers(t: Target, count: int) -> None:
    t.sleepers = Sleepers(t, count)


def stop_sleepers(t: Target) -> None:
    t.sleepers.close()


def exec_api(t: Target) -> float:
    c = client(t)
    cid = t.sleepers.ids()[0]
    eid = next_id("ex")

    def once():
        c.tasks.exec(cid, eid, ["true"])
        waiter = c.tasks.wait_async(cid, eid)
        c.tasks.start(cid, eid)
        assert waiter.result(timeout=30).code == 0
        c.tasks.delete_process(cid, eid)

    return timed(once)


def exec_cli(t: Target) -> float:
    cid = t.sleepers.ids()[0]
    if t.name == "runtimed":
        cmd = [*CTL, "--address", t.address, "--namespace",
               "bench", "exec", cid, "true"]
    else:
        cmd = ["ctr", "-a", t.address, "-n", "bench", "tasks", "exec", "--exec-id",
               next_id("ce"), cid, "true"]
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))


def shim_pids(t: Target) -> list[int]:
    """The shims of this daemon's containers. runtimed's write `shim.pid` into their bundles;
    its zygote and the spare shim (a fixed cost per daemon, not per container) carry the
    zygote's command line and are not counted. containerd's shims name its socket."""
    if t.name == "runtimed":
        return [int(p.read_text()) for p in (t.daemon.base / "state").glob("tasks/*/*/shim.pid")]
    marker = str(t.daemon.base)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "shim" in cmdline:
            pids.append(int(entry.name))
    return pids


# Idle means settled: runtimed closes a shim's connection 2 s after its last call and the
# shim's worker retires 1 s after that (docs/shim.md, "keeper and worker"); containerd's
# shims do not change after their start.
IDLE_SETTLE = 5.0


def idle_memory(t: Target, kind: str, count: int = 20) -> float:
    """Per idle container: mean shim memory, or the machine's used memory delta."""
    before = machine_used_memory()
    sleepers = Sleepers(t, count)
    try:
        time.sleep(IDLE_SETTLE)
        if kind == "machine":
            return (machine_used_memory() - before) / count / 1e6
        pids = shim_pids(t)
        values = [memory(p)[kind] for p in pids]
        return sum(values) / max(1, count) / 1e6
    finally:
        sleepers.close()


def many_containers(t: Target, count: int, parallel: bool) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from ctl.client import SpecOptions

    def one(_):
        with client(t).run(next_id("mc"), BUSYBOX, SpecOptions(args=["true"])) as running:
            assert running.wait(timeout=60).code == 0

    def all_of_them():
        if parallel:
            with ThreadPoolExecutor(count) as pool:
                list(pool.map(one, range(count)))
        else:
            for i in range(count):
                one(i)

    return timed(all_of_them)


def container_scenarios(quick: bool) -> list[Scenario]:
    return [
        Scenario("lifecycle create→start→wait→delete (API)", "s", "<= 0.5", lifecycle,
                 setup=ensure_busybox, tags={"containers"}),
        Scenario("run --rm true (CLI: ctl vs ctr)", "s", "<= 1.0", cli_run, runs=10,
                 setup=ensure_busybox, tags={"containers", "cli"}),
        Scenario("run --rm --network none true (CLI: ctl vs ctr)", "s", "<= 1.0",
                 lambda t: cli_run(t, "--network", "none"), runs=10,
                 setup=ensure_busybox, tags={"containers", "cli"}),
        Scenario("exec true (API)", "s", "<= 0.5", exec_api,
                 setup=lambda t: (ensure_busybox(t), start_sleepers(t, 1)),
                 teardown=stop_sleepers, tags={"containers"}),
        Scenario("exec true (CLI: ctl vs ctr)", "s", "<= 1.0", exec_cli, runs=10,
                 setup=lambda t: (ensure_busybox(t), start_sleepers(t, 1)),
                 teardown=stop_sleepers, tags={"containers", "cli"}),
        Scenario("20 containers one after another", "s", "<= 0.5",
                 lambda t: many_containers(t, 20, False), runs=10, setup=ensure_busybox),
        Scenario("20 containers at once", "s", "<= 0.5",
                 lambda t: many_containers(t, 20, True), runs=20, setup=ensure_busybox),
        Scenario("idle shim private memory / container", "MB", "<= 1.0",
                 lambda t: idle_memory(t, "private"), runs=1, setup=ensure_busybox),
        Scenario("idle shim PSS / container", "MB", "(info)",
                 lambda t: idle_memory(t, "pss"), runs=1, setup=ensure_busybox),
        Scenario("idle shim RSS / container", "MB", "(info)",
                 lambda t: idle_memory(t, "rss"), runs=1, setup=ensure_busybox),
        Scenario("machine memory / idle container", "MB", "<= 1.0",
                 lambda t: idle_memory(t, "machine"), runs=3, setup=ensure_busybox),
    ]


# ---- images ----------------------------------------------------------------------------

def _images():
    from tests.testimages import build

    return build(REPO / ".cache" / "bench-images", large=True)


def _ctr(t: Target, namespace: str, *args: str) -> None:
    done = subprocess.run(["ctr", "-a", t.address, "-n", namespace, *args], capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)} against {t.name} failed "
                           f"(exit {done.returncode}): {done.stderr.decode(errors='replace').strip()}")


def import_rate(t: Target, key: str) -> float:
    """MB/s of `ctr images import` (with unpack) into a fresh namespace, cleaned after."""
    image = _images()[key]
    namespace = next_id("imp")
    size = Path(image.archive).stat().st_size
    seconds = timed(lambda: _ctr(t, namespace, "images", "import", image.archive))
    _ctr(t, namespace, "images", "rm", "--sync", image.name)
    return size / seconds / 1e6


class Registry:
    """One docker-registry on loopback for the pull and push scenarios."""

    def __init__(self):
        from tests.registry_server import start_registry

        self._cm = start_registry()
        self.server = self._cm.__enter__()
        self.seeded = False

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


_registry: Registry | None = None


def registry(t: Target) -> Registry:
    """Start the registry once and push the large image to it (from the first daemon)."""
    global _registry
    if _registry is None:
        _registry = Registry()
    if not _registry.seeded:
        image = _images()["large"]
        _ctr(t, "seed", "images", "import", "--no-unpack", image.archive)
        _ctr(t, "seed", "images", "tag", image.name, f"{_registry.server.host}/bench/large:1")
        _ctr(t, "seed", "images", "push", "--plain-http", f"{_registry.server.host}/bench/large:1")
        # drop the seed so the pulls below really download (blobs are shared across namespaces)
        _ctr(t, "seed", "images", "rm", "--sync", image.name, f"{_registry.server.host}/bench/large:1")
        _registry.seeded = True
    return _registry


def close_registry() -> None:
    global _registry
    if _registry is not None:
        _registry.close()
        _registry = None


def pull_rate(t: Target, server_side: bool = False) -> float:
    """MB/s of pulling the ~200 MB image (with unpack) into a fresh namespace."""
    reg = registry(t)
    ref = f"{reg.server.host}/bench/large:1"
    namespace = next_id("pull")
    size = sum(Path(p).stat().st_size for p in [_images()["large"].archive])
    if server_side and t.name == "runtimed":
        cmd = [*CTL, "--address", t.address, "--namespace", namespace, "pull", ref]
        seconds = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
    else:
        seconds = timed(lambda: _ctr(t, namespace, "images", "pull", "--plain-http", ref))
    _ctr(t, namespace, "images", "rm", "--sync", ref)
    return size / seconds / 1e6


def push_rate(t: Target) -> float:
    reg = registry(t)
    image = _images()["large"]
    namespace = f"push-{t.name}"
    if not getattr(t, "push_ready", False):
        _ctr(t, namespace, "images", "import", "--no-unpack", image.archive)
        t.push_ready = True
    ref = f"{reg.server.host}/bench/{t.name}-{next_id('p')}:1"
    _ctr(t, namespace, "images", "tag", image.name, ref)
    size = Path(image.archive).stat().st_size
    seconds = timed(lambda: _ctr(t, namespace, "images", "push", "--plain-http", ref))
    return size / seconds / 1e6


def image_scenarios() -> list[Scenario]:
    return [
        Scenario("import+unpack busybox (ctr)", "MB/s", ">= 2.0 (time <= 0.5)",
                 lambda t: import_rate(t, "busybox"), runs=10, higher_is_better=True),
        Scenario("import+unpack ~200 MB, 4 layers (ctr)", "MB/s", ">= 2.0 (time <= 0.5)",
                 lambda t: import_rate(t, "large"), runs=10, higher_is_better=True),
        Scenario("pull ~200 MB with unpack (ctr --plain-http)", "MB/s", ">= 1.0",
                 pull_rate, runs=3, higher_is_better=True),
        Scenario("pull ~200 MB with unpack (ours: ctl pull)", "MB/s", ">= 1.0",
                 lambda t: pull_rate(t, server_side=True), runs=3, higher_is_better=True),
        Scenario("push ~200 MB (ctr --plain-http)", "MB/s", "(info)", push_rate, runs=3,
                 higher_is_better=True),
    ]


# ---- events ----------------------------------------------------------------------------

def event_delivery(t: Target, **load) -> dict[str, float]:
    """10 subscriber processes receive every TaskExit published on a fresh topic
    (bench/events.py says how and why in processes)."""
    from bench.events import run

    return run(t.channel, t.address, t.daemon.pid, f"/bench/{next_id('ev')}", **load)


# Throughput: 2000 events, up to 16 Publish calls in flight, so the daemons' fan-out is
# what is measured rather than one publish round trip per event. Latency: 300 events
# 2 ms apart, one at a time, so it is the path's latency and not time in queues.
_EVENT_FLOOD = {"events": 2000, "window": 16}
_EVENT_PACED = {"events": 300, "window": 1, "interval": 0.002}


def _flood(t: Target) -> dict[str, float]:
    """One flood, kept for the daemon-CPU row, which reads the floods the throughput row
    made (the same number of runs in the same A/B order) instead of flooding again."""
    result = event_delivery(t, **_EVENT_FLOOD)
    t.floods = [*getattr(t, "floods", []), result]
    return result


def _flooded(t: Target) -> dict[str, float]:
    floods = getattr(t, "floods", [])
    return floods.pop(0) if floods else event_delivery(t, **_EVENT_FLOOD)


def event_scenarios() -> list[Scenario]:
    return [
        Scenario("events: 10 subscribers, delivered/s", "ev/s", ">= 1.0",
                 lambda t: _flood(t)["throughput"], runs=5, higher_is_better=True),
        Scenario("events: daemon CPU per delivery", "µs", "<= 1.0",
                 lambda t: _flooded(t)["cpu_per_delivery"] * 1e6, runs=5),
        Scenario("events: publish→delivery latency", "ms", "<= 1.0",
                 lambda t: event_delivery(t, **_EVENT_PACED)["latency"] * 1e3, runs=5),
    ]
