"""The task table: one entry per running container, each backed by its shim.

`TaskManager` writes bundles, mounts root filesystems, starts shims, forwards what the
API asks to the right shim and relays each shim's events into the exchange. Shim events
are published in order and exactly once: runtimed records the last published sequence
number in the bundle (`published`) before acknowledging it to the shim, and resumes from
there after a restart, so exits that happened while runtimed was down are published once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed import identifiers
from runtimed.api.containerd.events import task_pb2 as events
from runtimed.api.containerd.types import mount_pb2
from runtimed.api.shim.v1 import shim_pb2
from runtimed.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    RuntimedError,
    Unavailable,
)
from runtimed.events.exchange import Event
from runtimed.runtime.shim import (
    CONNECT_TIMEOUT,
    BundleInfo,
    ShimClient,
    ShimManager,
    read_info,
    remove_bundle,
    write_info,
)
from runtimed.snapshots import mount as mounts

log = logging.getLogger("runtimed.tasks")

RUNTIME_NAMES = {"io.containerd.runc.v2", "io.containerd.runc.v1", "io.containerd.runtime.v1.linux"}
RUNC_OPTIONS = "containerd.runc.v1.Options"
DEAD_SHIM_EXIT = 255
PUBLISH_WAIT = 5.0


@dataclass(frozen=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class ProcessStatus:
    container_id: str
    exec_id: str
    pid: int
    status: int  # containerd.v1.types.Status
    stdio: Stdio
    exit_status: int
    exited_at: Timestamp


@dataclass(frozen=True)
class ExitStatus:
    pid: int
    exit_status: int
    exited_at: Timestamp


@dataclass
class Task:
    namespace: str
    id: str
    bundle: Path
    shim: ShimClient
    info: BundleInfo
    published: int = 0
    init_exit_published: bool = False
    forwarder: asyncio.Task | None = None
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    # what the /tasks/create event reports besides the pid (known to this runtimed only)
    created_io: Stdio = Stdio()
    rootfs: list[mounts.Mount] = field(default_factory=list)


def default_runtime() -> str:
    """The built-in OCI runtime when it is installed, else runc."""
    return "" if importlib.util.find_spec("shimd.oci") is not None else "runc"


def runtime_binary(runtime_name: str, options: tuple[str, bytes] | None) -> str:
    """The OCI runtime command for a container's runtime name and options."""
    if runtime_name and runtime_name not in RUNTIME_NAMES:
        raise NotFound(
            f"runtime {runtime_name!r} is not supported: use one of {', '.join(sorted(RUNTIME_NAMES))}"
        )
    if options and options[0].rsplit("/", 1)[-1] == RUNC_OPTIONS and options[1]:
        from runtimed.api.containerd.runtime.v2.runc.options import oci_pb2

        parsed = oci_pb2.Options()
        parsed.ParseFromString(options[1])
        if parsed.binary_name:
            return parsed.binary_name
    return default_runtime()


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class TaskManager:
    def __init__(self, state: Path, containers, exchange):
        self.shims = ShimManager(state)
        self.containers = containers
        self.exchange = exchange
        self.tasks: dict[tuple[str, str], Task] = {}
        self._creating: set[tuple[str, str]] = set()

    # --- lookup ----------------------------------------------------------------------

    def get(self, namespace: str, id: str) -> Task:
        try:
            return self.tasks[(namespace, id)]
        except KeyError:
            raise NotFound(f"task {id!r} not found in namespace {namespace!r}") from None

    def list(self, namespace: str) -> list[Task]:
        return [t for (ns, _), t in sorted(self.tasks.items()) if ns == namespace]

    # --- create / delete -------------------------------------------------------------

    async def create(
        self,
        namespace: str,
        id: str,
        rootfs: list[mounts.Mount],
        stdio: Stdio,
        options: tuple[str, bytes] | None = None,
    ) -> int:
        identifiers.validate(id, "container id")
        key = (namespace, id)
        if key in self.tasks or key in self._creating:
            raise AlreadyExists(f"task {id!r} already exists in namespace {namespace!r}")
        container = self.containers.get(namespace, id)
        runtime_options = options if options and options[1] else (
            (container.runtime_options.type_url, container.runtime_options.value)
            if container.runtime_options else None
        )
        binary = runtime_binary(container.runtime_name, runtime_options)
        try:
            spec = json.loads(container.spec.value)
        except ValueError as exc:
            raise InvalidArgument(f"container {id!r} has no valid OCI spec: {exc}") from None
        self._creating.add(key)
        bundle = self.shims.bundle_path(namespace, id)
        shim: ShimClient | None = None
        info = BundleInfo(namespace, id, binary, bool(rootfs))
        try:
            await asyncio.to_thread(self._write_bundle, bundle, info, spec, rootfs)
            shim = await self.shims.start(namespace, id, bundle)
            response = await shim.call("Create", shim_pb2.CreateRequest(
                id=id, bundle=str(bundle), runtime=binary,
                stdio=shim_pb2.Stdio(stdin=stdio.stdin, stdout=stdio.stdout,
                                     stderr=stdio.stderr, terminal=stdio.terminal),
            ))
        except BaseException:
            if shim is not None:
                with contextlib.suppress(RuntimedError):
                    await shim.call("Shutdown", shim_pb2.ShutdownRequest(id=id, now=True), 5)
                await shim.close()
            with contextlib.suppress(Exception):
                await self.shims.cleanup(info, bundle)
            raise
        finally:
            self._creating.discard(key)
        task = Task(namespace, id, bundle, shim, info, created_io=stdio, rootfs=list(rootfs))
        self.tasks[key] = task
        task.forwarder = asyncio.ensure_future(self._forward(task))
        return response.pid

    def _write_bundle(self, bundle: Path, info: BundleInfo, spec: dict,
                      rootfs: list[mounts.Mount]) -> None:
        from shimd.outbox import write_atomic

        if bundle.exists():
            remove_bundle(bundle)  # a leftover no shim claims (the task table has no entry)
        bundle.mkdir(parents=True, mode=0o711)
        write_info(bundle, info)
        if rootfs:
            (bundle / "rootfs").mkdir(mode=0o755)
            spec.setdefault("root", {})["path"] = "rootfs"
            try:
                mounts.mount_all(rootfs, bundle / "rootfs")
            except OSError as exc:
                if exc.errno not in (22, 2, 19, 20):  # EINVAL ENOENT ENODEV ENOTDIR
                    raise
                raise InvalidArgument(f"rootfs cannot be mounted: {exc.strerror}") from exc
        write_atomic(bundle / "config.json", json.dumps(spec).encode())

    async def delete(self, namespace: str, id: str) -> ExitStatus:
        task = self.get(namespace, id)
        response = await task.shim.call("Delete", shim_pb2.DeleteRequest(id=id))
        await self._wait_published(task, response.event_seq)
        await self._remove(task)
        return ExitStatus(response.pid, response.exit_status, response.exited_at)

    async def delete_process(self, namespace: str, id: str, exec_id: str) -> ExitStatus:
        if not exec_id:
            raise InvalidArgument("DeleteProcess needs an exec id; delete the task instead")
        task = self.get(namespace, id)
        response = await task.shim.call("Delete", shim_pb2.DeleteRequest(id=id, exec_id=exec_id))
        return ExitStatus(response.pid, response.exit_status, response.exited_at)

    async def _remove(self, task: Task) -> None:
        self.tasks.pop((task.namespace, task.id), None)
        with contextlib.suppress(RuntimedError):
            await task.shim.call("Shutdown", shim_pb2.ShutdownRequest(id=task.id, now=True), 5)
        if task.forwarder is not None:
            task.forwarder.cancel()
            with contextlib.suppress(BaseException):
                await task.forwarder
        await task.shim.close()
        await asyncio.to_thread(remove_bundle, task.bundle)

    # --- process operations ----------------------------------------------------------

    async def start(self, namespace: str, id: str, exec_id: str = "") -> int:
        task = self.get(namespace, id)
        return (await task.shim.call("Start", shim_pb2.StartRequest(id=id, exec_id=exec_id))).pid

    async def state(self, namespace: str, id: str, exec_id: str = "") -> ProcessStatus:
        task = self.get(namespace, id)
        s = await task.shim.call("State", shim_pb2.StateRequest(id=id, exec_id=exec_id))
        return ProcessStatus(
            id, exec_id, s.pid, s.status,
            Stdio(s.stdio.stdin, s.stdio.stdout, s.stdio.stderr, s.stdio.terminal),
            s.exit_status, s.exited_at,
        )

    async def states(self, namespace: str) -> list[ProcessStatus]:
        results = await asyncio.gather(
            *(self.state(namespace, t.id) for t in self.list(namespace)), return_exceptions=True
        )
        return [r for r in results if isinstance(r, ProcessStatus)]

    async def wait(self, namespace: str, id: str, exec_id: str = "") -> ExitStatus:
        task = self.get(namespace, id)
        try:
            r = await task.shim.call("Wait", shim_pb2.WaitRequest(id=id, exec_id=exec_id))
        except Unavailable:
            if not exec_id:
                for _ in range(40):  # a killed shim closes its sockets a moment before it dies
                    if not _shim_alive(task.bundle):
                        # the shim died under the wait: report what its TaskExit event says
                        return ExitStatus(_init_pid(task.bundle), DEAD_SHIM_EXIT,
                                          _ts(time.time()))
                    await asyncio.sleep(0.05)
            raise
        return ExitStatus(r.pid, r.exit_status, r.exited_at)

    async def kill(self, namespace: str, id: str, exec_id: str, signal: int, all: bool) -> None:
        task = self.get(namespace, id)
        await task.shim.call(
            "Kill", shim_pb2.KillRequest(id=id, exec_id=exec_id, signal=signal, all=all)
        )

    async def exec(self, namespace: str, id: str, exec_id: str, stdio: Stdio,
                   process: bytes) -> None:
        task = self.get(namespace, id)
        await task.shim.call("Exec", shim_pb2.ExecRequest(
            id=id, exec_id=exec_id, process=process,
            stdio=shim_pb2.Stdio(stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
                                 terminal=stdio.terminal),
        ))

    async def resize_pty(self, namespace: str, id: str, exec_id: str, width: int,
                         height: int) -> None:
        task = self.get(namespace, id)
        await task.shim.call("ResizePty", shim_pb2.ResizePtyRequest(
            id=id, exec_id=exec_id, width=width, height=height))

    async def close_io(self, namespace: str, id: str, exec_id: str, stdin: bool) -> None:
        task = self.get(namespace, id)
        await task.shim.call("CloseIO", shim_pb2.CloseIORequest(id=id, exec_id=exec_id, stdin=stdin))

    async def pause(self, namespace: str, id: str) -> None:
        await self.get(namespace, id).shim.call("Pause", shim_pb2.PauseRequest(id=id))

    async def resume(self, namespace: str, id: str) -> None:
        await self.get(namespace, id).shim.call("Resume", shim_pb2.ResumeRequest(id=id))

    async def pids(self, namespace: str, id: str) -> list[tuple[int, str]]:
        task = self.get(namespace, id)
        r = await task.shim.call("Pids", shim_pb2.PidsRequest(id=id))
        return [(p.pid, p.exec_id) for p in r.processes]

    async def update(self, namespace: str, id: str, resources: bytes) -> None:
        task = self.get(namespace, id)
        await task.shim.call("Update", shim_pb2.UpdateRequest(id=id, resources=resources))

    async def stats(self, namespace: str, id: str):
        """The task's cgroup metrics as a google.protobuf.Any."""
        task = self.get(namespace, id)
        return (await task.shim.call("Stats", shim_pb2.StatsRequest(id=id))).stats

    async def metrics(self, namespace: str, wanted) -> list[tuple[str, object]]:
        """(id, metrics Any) of every task `wanted(task)` accepts; like containerd, a task
        that cannot report (stopped, just deleted) is left out rather than failing all."""
        result = []
        for task in self.list(namespace):
            if not wanted(task):
                continue
            try:
                result.append((task.id, await self.stats(namespace, task.id)))
            except RuntimedError as exc:
                log.debug("%s/%s: no metrics: %s", namespace, task.id, exc)
        return result

    # --- events ----------------------------------------------------------------------

    async def _forward(self, task: Task) -> None:
        """Relay the shim's outbox into the exchange, in order, until the shim is gone."""
        failures = 0
        while True:
            try:
                async for event in task.shim.events(task.published):
                    failures = 0
                    await self._publish(task, event)
                    with contextlib.suppress(RuntimedError):
                        await task.shim.call("Ack", shim_pb2.AckRequest(seq=event.seq), 5)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.debug("%s/%s: event stream: %s", task.namespace, task.id, exc.code())
            failures += 1
            if not _shim_alive(task.bundle):
                await self._shim_died(task)
                return
            if failures % 30 == 0:  # alive but not answering: keep trying, never kill it
                log.warning("%s/%s: shim alive but not answering", task.namespace, task.id)
            await asyncio.sleep(min(0.1 * failures, 1.0))

    async def _publish(self, task: Task, event: shim_pb2.Event) -> None:
        message = _containerd_event(task, event)
        if message is not None:
            self.exchange.forward(
                Event.of(task.namespace, event.topic, message, event.timestamp.ToNanoseconds())
            )
        if event.topic == "/tasks/exit" and not event.exec_id:
            task.init_exit_published = True
        task.published = event.seq
        _record_published(task)
        async with task.progress:
            task.progress.notify_all()

    async def _wait_published(self, task: Task, seq: int) -> None:
        try:
            async with task.progress:
                await asyncio.wait_for(
                    task.progress.wait_for(lambda: task.published >= seq), PUBLISH_WAIT
                )
        except TimeoutError:
            log.warning("%s/%s: events up to %d not relayed in time", task.namespace, task.id, seq)

    async def _shim_died(self, task: Task) -> None:
        """The shim is gone: publish what it left in its outbox, an exit (status 255) if
        init was created but its exit never reported, and clean up the bundle, mounts and
        container."""
        log.warning("%s/%s: shim died; cleaning up", task.namespace, task.id)
        self.tasks.pop((task.namespace, task.id), None)
        await self._publish_leftovers(task)
        await task.shim.close()
        await self.shims.cleanup(task.info, task.bundle)

    async def _publish_leftovers(self, task: Task) -> None:
        from shimd.outbox import Outbox

        for record in Outbox(task.bundle / "events.jsonl").after(task.published):
            if record["topic"] == "/tasks/delete":
                continue
            await self._publish(task, _record_to_event(record))
        if not task.init_exit_published and (task.bundle / "init.pid").exists():
            now = time.time()
            self.exchange.publish(task.namespace, "/tasks/exit", events.TaskExit(
                container_id=task.id, id=task.id, pid=_init_pid(task.bundle),
                exit_status=DEAD_SHIM_EXIT, exited_at=_ts(now)))
            task.init_exit_published = True
            _record_published(task)

    # --- restart ---------------------------------------------------------------------

    async def load(self) -> None:
        """Find the shims of a previous runtimed, reconnect, rebuild the table."""
        for namespace, id, bundle in self.shims.scan():
            info = read_info(bundle)
            if info is None:
                log.warning("%s: not a complete bundle; removing", bundle)
                await asyncio.to_thread(remove_bundle, bundle)
                continue
            published, init_exit = _read_published(bundle)
            try:
                address = (bundle / "address").read_text().strip()
            except FileNotFoundError:
                address = ""
            if not address or not _shim_alive(bundle):
                log.warning("%s/%s: shim is gone", namespace, id)
                task = Task(namespace, id, bundle, ShimClient(id, "unix:///dev/null", bundle),
                            info, published, init_exit)
                await self._shim_died(task)
                continue
            try:
                shim = await self.shims.connect(id, address, bundle)
            except RuntimedError as exc:  # alive: keep it; the relay retries until it answers
                log.warning("%s/%s: shim alive but not answering yet (%s)", namespace, id, exc)
                shim = ShimClient(id, address, bundle)
            task = Task(namespace, id, bundle, shim, info, published, init_exit)
            try:
                await shim.call("State", shim_pb2.StateRequest(id=id), CONNECT_TIMEOUT)
            except NotFound:
                # deleted, but runtimed went down before it shut the shim down: finish that
                log.info("%s/%s: task was deleted; removing its shim and bundle", namespace, id)
                from shimd.outbox import Outbox

                task.forwarder = asyncio.ensure_future(self._forward(task))
                await self._wait_published(task, Outbox(bundle / "events.jsonl").seq)
                await self._remove(task)
                continue
            except RuntimedError as exc:
                log.warning("%s/%s: shim state: %s", namespace, id, exc)
            self.tasks[(namespace, id)] = task
            task.forwarder = asyncio.ensure_future(self._forward(task))
            log.info("%s/%s: reconnected to shim at %s", namespace, id, address)

    async def close(self) -> None:
        """runtimed stops: the shims (and their containers) keep running; the zygote goes."""
        for task in list(self.tasks.values()):
            if task.forwarder is not None:
                task.forwarder.cancel()
            await task.shim.close()
        await self.shims.stop_zygote()


def _containerd_event(task: Task, e: shim_pb2.Event):
    cid = task.id
    match e.topic:
        case "/tasks/create":
            io = task.created_io
            return events.TaskCreate(
                container_id=cid, bundle=str(task.bundle), pid=e.pid,
                rootfs=[m.to_proto(mount_pb2.Mount) for m in task.rootfs],
                io=events.TaskIO(stdin=io.stdin, stdout=io.stdout, stderr=io.stderr,
                                 terminal=io.terminal),
            )
        case "/tasks/start":
            return events.TaskStart(container_id=cid, pid=e.pid)
        case "/tasks/exit":
            return events.TaskExit(container_id=cid, id=e.exec_id or cid, pid=e.pid,
                                   exit_status=e.exit_status, exited_at=e.exited_at)
        case "/tasks/delete":
            return events.TaskDelete(container_id=cid, pid=e.pid, exit_status=e.exit_status,
                                     exited_at=e.exited_at, id=e.exec_id)
        case "/tasks/oom":
            return events.TaskOOM(container_id=cid)
        case "/tasks/exec-added":
            return events.TaskExecAdded(container_id=cid, exec_id=e.exec_id)
        case "/tasks/exec-started":
            return events.TaskExecStarted(container_id=cid, exec_id=e.exec_id, pid=e.pid)
        case "/tasks/paused":
            return events.TaskPaused(container_id=cid)
        case "/tasks/resumed":
            return events.TaskResumed(container_id=cid)
    log.warning("unknown shim event topic %s", e.topic)
    return None


def _record_to_event(record: dict) -> shim_pb2.Event:
    event = shim_pb2.Event(
        seq=record["seq"], topic=record["topic"], id=record.get("id", ""),
        exec_id=record.get("exec_id", ""), pid=record.get("pid", 0),
        exit_status=record.get("exit_status", 0),
    )
    if record.get("exited_at"):
        event.exited_at.CopyFrom(_ts(record["exited_at"]))
    event.timestamp.CopyFrom(_ts(record.get("timestamp") or time.time()))
    return event


def _record_published(task: Task) -> None:
    from shimd.outbox import write_atomic

    with contextlib.suppress(FileNotFoundError):
        write_atomic(task.bundle / "published", json.dumps(
            {"seq": task.published, "init_exit": task.init_exit_published}).encode())


def _read_published(bundle: Path) -> tuple[int, bool]:
    try:
        data = json.loads((bundle / "published").read_text())
        return int(data["seq"]), bool(data.get("init_exit"))
    except (FileNotFoundError, ValueError, KeyError):
        return 0, False


def _init_pid(bundle: Path) -> int:
    try:
        return int((bundle / "init.pid").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _shim_alive(bundle: Path) -> bool:
    try:
        pid = int((bundle / "shim.pid").read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

