"""The task table: one entry per running container, each backed by its shim.

`TaskManager` writes bundles, mounts root filesystems, starts shims, forwards what the
API asks to the right shim and relays each shim's events into the exchange. Shim events
are published in order and exactly once: runtimed records the last published sequence
number in its record of the bundle (`runtimed.json`) and resumes from there after a
restart, so exits that happened while runtimed was down are published once. The relay
holds nothing open to the shim: it follows the shim's outbox file with inotify
(runtimed/runtime/outboxes.py) and learns that the shim died from a pidfd, so an idle
shim has no call or connection from runtimed to serve. The shim trims its outbox itself,
from that record.

Delete unmounts the rootfs and moves the bundle out of `<state>/tasks` (a rename into
`<state>/trash`) before it answers; the shim's shutdown and the removal of the moved
directory finish in the background, the directory only once the shim process has exited,
so nothing it still writes can land in a directory being removed. A create of the same
id waits for that; a restart kills what is left of such shims and empties the trash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.util
import json
import logging
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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
from runtimed.runtime.outboxes import OUTBOX, OutboxReader, OutboxWatcher
from runtimed.runtime.shim import (
    CONNECT_TIMEOUT,
    BundleInfo,
    ShimClient,
    ShimManager,
    read_info,
    remove_bundle,
    shim_pid_file,
    shim_running,
)
from runtimed.snapshots import mount as mounts
from shimd.outbox import RECORD, read_after

log = logging.getLogger("runtimed.tasks")

RUNTIME_NAMES = {"io.containerd.runc.v2", "io.containerd.runc.v1", "io.containerd.runtime.v1.linux"}
RUNC_OPTIONS = "containerd.runc.v1.Options"
DEAD_SHIM_EXIT = 255
PUBLISH_WAIT = 5.0
POLL = 1.0  # seconds between looks at a shim when inotify or a pidfd cannot be had
SHIM_EXIT_TIMEOUT = 10.0  # after Shutdown; then the shim of a deleted task is killed
STOPPED = 3  # containerd.v1.types.Status


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
    # init's pid, from its /tasks/create once published (kept in the record, for a
    # /tasks/exit runtimed reports itself after the shim died)
    init_pid: int = 0
    forwarder: asyncio.Task | None = None  # the relay (`TaskManager._relay`)
    outbox: OutboxReader | None = None  # the relay's reader of the shim's outbox
    record_fd: int = -1  # `runtimed.json`, open while the relay runs (`_record_published`)
    record_size: int = 0  # its length: a rewrite is padded to it (`_record_published`)
    shim_exiting: bool = False  # its Delete told the shim to exit: no Shutdown call
    dying: bool = False  # the relay found the shim dead and is cleaning up after it
    removing: bool = False  # deleted: the relay leaves the cleanup to `_remove`
    # init's exit once its /tasks/exit is relayed: final, so Get and Wait answer from it
    init_exit: ExitStatus | None = None
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    # what the /tasks/create event reports besides the pid (known to this runtimed only)
    created_io: Stdio = Stdio()
    rootfs: list[mounts.Mount] = field(default_factory=list)


@functools.cache
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
        self.outboxes = OutboxWatcher()
        self.trash = state / "trash"
        self._creating: set[tuple[str, str]] = set()
        # deleted tasks whose shim is still shutting down: their bundle is in the trash
        self._removals: dict[tuple[str, str], asyncio.Future] = {}

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
        made = False  # the bundle: before it, nothing of this create's to discard
        try:
            pending = self._removals.get(key)
            if pending is not None:  # the previous shim of this id is still exiting
                with contextlib.suppress(Exception):  # (its failure is not this create's)
                    await asyncio.shield(pending)
            made = True
            record_size = await asyncio.to_thread(self._write_bundle, bundle, info, spec, rootfs)
            shim = await self.shims.start(namespace, id, bundle)
            response = await shim.call("Create", shim_pb2.CreateRequest(
                id=id, bundle=str(bundle), runtime=binary,
                stdio=shim_pb2.Stdio(stdin=stdio.stdin, stdout=stdio.stdout,
                                     stderr=stdio.stderr, terminal=stdio.terminal),
            ))
        except BaseException:
            if not made:  # cancelled while the previous shim exits: its bundle, not ours
                raise
            # runs to its end even when the caller goes (a client's deadline during it left
            # the bundle and its mounts behind); a create of the same id waits for it
            discarding = asyncio.ensure_future(self._discard(shim, info, bundle))
            self._track_removal(key, discarding)
            await asyncio.shield(discarding)
            raise
        finally:
            self._creating.discard(key)
        task = Task(namespace, id, bundle, shim, info, record_size=record_size,
                    created_io=stdio, rootfs=list(rootfs))
        self.tasks[key] = task
        task.forwarder = asyncio.ensure_future(self._relay(task))
        return response.pid

    async def _discard(self, shim: ShimClient | None, info: BundleInfo, bundle: Path) -> None:
        """After a failed create: the shim gone before its bundle (it writes there until it
        exits), then the runtime's leftovers, the mounts and the bundle."""
        if shim is not None:
            await self.shims.dispose(shim)
        with contextlib.suppress(Exception):
            await self.shims.cleanup(info, bundle)

    def _write_bundle(self, bundle: Path, info: BundleInfo, spec: dict,
                      rootfs: list[mounts.Mount]) -> int:
        """Make the bundle; the length of runtimed's record in it (a rewrite pads to it)."""
        if bundle.exists():
            remove_bundle(bundle)  # a leftover no shim claims (the task table has no entry)
        for attempt in range(3):
            try:
                bundle.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
                bundle.mkdir(mode=0o711)
                break
            except FileNotFoundError:  # a delete just removed the empty namespace dir
                if attempt == 2:
                    raise
        # a fresh directory nobody reads yet: plain writes, no temp + rename (each rename is
        # a journal transaction, 0.2-2.5 ms on this disk); a crash before the shim serves
        # leaves a bundle that `load` removes (incomplete runtimed.json, or no shim)
        record = _record(info, 0, False, 0)
        _write_new(bundle / RECORD, record)
        if rootfs:
            (bundle / "rootfs").mkdir(mode=0o755)
            spec.setdefault("root", {})["path"] = "rootfs"
            try:
                mounts.mount_all(rootfs, bundle / "rootfs")
            except OSError as exc:
                if exc.errno not in (22, 2, 19, 20):  # EINVAL ENOENT ENODEV ENOTDIR
                    raise
                raise InvalidArgument(f"rootfs cannot be mounted: {exc.strerror}") from exc
        _write_new(bundle / "config.json", json.dumps(spec).encode())
        return len(record)

    async def delete(self, namespace: str, id: str) -> ExitStatus:
        task = self.get(namespace, id)
        unmounting = None
        if task.init_exit is not None and task.info.rootfs_mounted:
            # init has exited: nothing uses the host's rootfs mount (the container's own
            # mount namespace had its copy), so unmount it while the shim deletes; should
            # the shim refuse, the task stays stopped, its rootfs unmounted
            unmounting = asyncio.ensure_future(
                asyncio.to_thread(_unmount_rootfs, task.bundle / "rootfs"))
        try:
            response = await task.shim.call("Delete", shim_pb2.DeleteRequest(id=id, shutdown=True))
            task.shim_exiting = response.shutting_down  # (a shim from before asks for Shutdown)
        finally:
            if unmounting is not None:
                await asyncio.wait({unmounting})
                if not unmounting.cancelled() and unmounting.exception() is not None:
                    log.debug("%s/%s: early unmount: %s", namespace, id, unmounting.exception())
        await self._remove(task, response.event_seq)
        return ExitStatus(response.pid, response.exit_status, response.exited_at)

    async def delete_process(self, namespace: str, id: str, exec_id: str) -> ExitStatus:
        if not exec_id:
            raise InvalidArgument("DeleteProcess needs an exec id; delete the task instead")
        task = self.get(namespace, id)
        response = await task.shim.call("Delete", shim_pb2.DeleteRequest(id=id, exec_id=exec_id))
        return ExitStatus(response.pid, response.exit_status, response.exited_at)

    async def _remove(self, task: Task, published: int | None = None) -> None:
        """Take a deleted task out: its rootfs unmounted, its bundle moved to the trash and
        its events up to `published` relayed before returning (the last two at the same
        time); the shim's shutdown and the bundle's removal in the background."""
        key = (task.namespace, task.id)
        if self.tasks.get(key) is task:
            del self.tasks[key]
        if task.dying:  # the relay is already cleaning up after a dead shim: let it finish
            with contextlib.suppress(BaseException):
                await asyncio.shield(task.forwarder)
            return
        task.removing = True
        if task.outbox is not None:  # the relay reads on from the trash
            with contextlib.suppress(OSError):
                task.outbox.pin()
        retiring = asyncio.ensure_future(asyncio.to_thread(self._retire, task.bundle))
        try:
            if published is not None:
                await self._wait_published(task, published)
            await self._stop_relay(task)
            await asyncio.shield(retiring)  # Unavailable while the rootfs stays mounted
        finally:  # even then (or cancelled) the shim goes; the bundle only if retired
            self._track_removal(key, asyncio.ensure_future(self._finish_removal(task, retiring)))

    def _track_removal(self, key: tuple[str, str], removal: asyncio.Future) -> None:
        """A create of the same id waits for `removal` (the old shim must be gone first:
        it removes its socket and address by path when it exits). One still pending is
        waited for as well, never replaced."""
        previous = self._removals.get(key)
        if previous is not None and previous is not removal and not previous.done():
            removal = asyncio.ensure_future(_after_both(previous, removal))
        self._removals[key] = removal

        def forget(done: asyncio.Future) -> None:
            if self._removals.get(key) is done:
                del self._removals[key]

        removal.add_done_callback(forget)

    async def _stop_relay(self, task: Task) -> None:
        """Stop relaying events (before the shim is told to go)."""
        if task.forwarder is not None and not task.forwarder.done():
            task.forwarder.cancel()
            with contextlib.suppress(BaseException):
                await task.forwarder

    def _retire(self, bundle: Path) -> Path | None:
        """Unmount the rootfs (the caller may remove its snapshot next) and move the bundle
        into the trash; returns where it went. Never moves a bundle with a mount in it."""
        rootfs = bundle / "rootfs"
        try:
            _unmount_rootfs(rootfs)
        except OSError as exc:
            log.warning("%s not removed (%s): the bundle is kept", rootfs, exc)
            return None
        self.trash.mkdir(mode=0o700, exist_ok=True)
        retired = self.trash / f"{bundle.parent.name}.{bundle.name}.{uuid.uuid4().hex[:12]}"
        os.rename(bundle, retired)  # the namespace dir stays (as containerd's): no rmdir
        return retired  # racing the next create's mkdir, two journal updates per lifecycle

    async def _finish_removal(self, task: Task, retiring: asyncio.Future) -> None:
        """Shut the shim down, wait until its process is gone, then remove its files."""
        await self._stop_relay(task)
        try:
            retired = await retiring
        except Exception:  # noqa: BLE001 - reported to the Delete that retired it
            retired = None
        try:
            await self.shims.dispose(task.shim, SHIM_EXIT_TIMEOUT, retired,
                                     told=task.shim_exiting)
        finally:
            if retired is not None:
                await asyncio.to_thread(shutil.rmtree, retired, True)

    def _empty_trash(self) -> None:
        """At start: what a previous runtimed was removing when it stopped. The shims of
        those deleted tasks are killed (their containers are gone), then the files go."""
        if not self.trash.is_dir():
            return
        for retired in sorted(self.trash.iterdir()):
            pid = shim_pid_file(retired)
            if pid and shim_running(retired, pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 2
                while shim_running(retired, pid) is not False and time.monotonic() < deadline:
                    time.sleep(0.01)
            with contextlib.suppress(OSError):
                _unmount_rootfs(retired / "rootfs")
                shutil.rmtree(retired)
        with contextlib.suppress(OSError):
            self.trash.rmdir()

    # --- process operations ----------------------------------------------------------

    async def start(self, namespace: str, id: str, exec_id: str = "") -> int:
        task = self.get(namespace, id)
        return (await task.shim.call("Start", shim_pb2.StartRequest(id=id, exec_id=exec_id))).pid

    async def state(self, namespace: str, id: str, exec_id: str = "") -> ProcessStatus:
        task = self.get(namespace, id)
        if not exec_id and task.init_exit is not None:
            e = task.init_exit
            return ProcessStatus(id, "", e.pid, STOPPED, task.created_io, e.exit_status,
                                 e.exited_at)
        s = await task.shim.call("State", shim_pb2.StateRequest(id=id, exec_id=exec_id))
        return ProcessStatus(
            id, exec_id, s.pid, s.status,
            Stdio(s.stdio.stdin, s.stdio.stdout, s.stdio.stderr, s.stdio.terminal),
            s.exit_status, s.exited_at,
        )

    async def states(self, namespace: str) -> list[ProcessStatus]:
        tasks = self.list(namespace)
        if not tasks:
            return []
        results = await asyncio.gather(
            *(self.state(namespace, t.id) for t in tasks), return_exceptions=True
        )
        return [r for r in results if isinstance(r, ProcessStatus)]

    async def wait(self, namespace: str, id: str, exec_id: str = "") -> ExitStatus:
        task = self.get(namespace, id)
        if not exec_id and task.init_exit is None and not task.init_exit_published:
            await self._relayed_exit(task)
        if not exec_id and task.init_exit is not None:
            return task.init_exit
        try:
            r = await task.shim.call("Wait", shim_pb2.WaitRequest(id=id, exec_id=exec_id))
        except Unavailable:
            if not exec_id:
                for _ in range(40):  # a killed shim closes its sockets a moment before it dies
                    if shim_running(task.bundle) is False:
                        # the shim died under the wait: report what its TaskExit event says
                        return ExitStatus(_init_pid(task), DEAD_SHIM_EXIT,
                                          _ts(time.time()))
                    await asyncio.sleep(0.05)
            raise
        return ExitStatus(r.pid, r.exit_status, r.exited_at)

    async def _relayed_exit(self, task: Task) -> None:
        """Until init's exit is relayed or the relay is over (the shim died: its exit is
        set then too; the task deleted or runtimed stopping). The shim reports the exit as
        an event anyway, so waiting for the relay costs the shim nothing, where a Wait call
        held a stream open on both sides per container. The caller asks the shim when the
        exit is still unknown after this (or was relayed before a restart)."""
        relay = task.forwarder
        if relay is None or relay.done():
            return

        async def exit_relayed() -> None:
            async with task.progress:
                await task.progress.wait_for(lambda: task.init_exit is not None)

        waiter = asyncio.ensure_future(exit_relayed())
        try:
            await asyncio.wait({waiter, relay}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

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

    async def _relay(self, task: Task) -> None:
        """Relay the shim's outbox into the exchange, in order, until the shim is gone: a
        read of what was appended on every inotify notification of the outbox (and one
        right away, for what came before the watch), until the shim's pidfd says it
        exited; then clean up after it. No call to the shim is held open for this."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        reader = pidfd = None
        exited = polling = False

        def shim_exited() -> None:
            nonlocal exited
            loop.remove_reader(pidfd)
            exited = True
            changed.set()

        try:
            reader = task.outbox = OutboxReader(task.bundle)
            with contextlib.suppress(OSError):  # (else each record opens it)
                task.record_fd = _open_record(task.bundle)
            try:
                self.outboxes.watch(task.bundle, changed.set)
            except OSError as exc:  # (no inotify fd or watch left: its outbox is polled)
                log.warning("%s/%s: outbox not watched: %s", task.namespace, task.id, exc)
                # a bundle that is gone: so is the shim that worked in it
                exited = exc.errno in (errno.ENOENT, errno.ENOTDIR)
                polling = True
            if not exited:
                pidfd = _shim_pidfd(task)
                if pidfd is None:  # out of fds: whether it runs is polled
                    polling = True
                elif pidfd < 0:  # gone already, or its pid is some other process's by now
                    exited = True
                else:
                    loop.add_reader(pidfd, shim_exited)
            while True:
                changed.clear()
                late = False
                try:
                    for record in reader.read():
                        if record["seq"] > task.published:
                            await self._publish(task, _record_to_event(record))
                except OSError as exc:  # out of fds, say: read again in a while
                    log.warning("%s/%s: outbox: %s", task.namespace, task.id, exc)
                    late = True
                if exited:
                    break
                if not (polling or late):
                    await changed.wait()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), POLL)
                if pidfd is None and shim_running(task.bundle) is False:
                    exited = True  # (None, cannot tell: polled again)
        finally:
            self.outboxes.unwatch(task.bundle)
            if pidfd is not None and pidfd >= 0:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            if reader is not None:
                task.outbox = None
                reader.close()
            if task.record_fd >= 0:
                os.close(task.record_fd)
                task.record_fd = -1
        if task.removing:
            return
        task.dying = True
        self._track_removal((task.namespace, task.id), asyncio.current_task())
        await self._shim_died(task)

    async def _publish(self, task: Task, event: shim_pb2.Event) -> None:
        message = _containerd_event(task, event)
        if message is not None:
            self.exchange.forward(
                Event.of(task.namespace, event.topic, message, event.timestamp.ToNanoseconds())
            )
        if event.topic == "/tasks/create":
            task.init_pid = event.pid
        elif event.topic == "/tasks/exit" and not event.exec_id:
            task.init_exit_published = True
            task.init_exit = ExitStatus(event.pid, event.exit_status, event.exited_at)
        task.published = event.seq
        _record_published(task)  # never raises: a failed write is logged
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
        init's create was reported but its exit never was, and clean up the bundle, mounts
        and container."""
        log.warning("%s/%s: shim died; cleaning up", task.namespace, task.id)
        if self.tasks.get((task.namespace, task.id)) is task:
            del self.tasks[(task.namespace, task.id)]
        await self._publish_leftovers(task)
        await task.shim.close()
        await self.shims.cleanup(task.info, task.bundle)

    async def _publish_leftovers(self, task: Task) -> None:
        # Created means /tasks/create reported, not init.pid there: a shim of a runtime's
        # command line writes init.pid while the init still sets up, and a shim killed then
        # leaves no created task (an exit of it would come with no create before it). The
        # relay starts only once Create answered, after the shim appended /tasks/create
        # (its seq 1), so anything relayed means the create was. A /tasks/delete the shim
        # recorded is not published here (nor was it before the init's Delete told the
        # shim to exit; runtimed killed right after that answer now lands here too).
        created = task.published > 0
        for record in read_after(task.bundle / OUTBOX, task.published):
            created = created or record["topic"] == "/tasks/create"
            if record["topic"] == "/tasks/delete":
                continue
            await self._publish(task, _record_to_event(record))
        if not task.init_exit_published and created:
            pid, exited_at = _init_pid(task), _ts(time.time())
            self.exchange.publish(task.namespace, "/tasks/exit", events.TaskExit(
                container_id=task.id, id=task.id, pid=pid,
                exit_status=DEAD_SHIM_EXIT, exited_at=exited_at))
            task.init_exit_published = True
            task.init_exit = ExitStatus(pid, DEAD_SHIM_EXIT, exited_at)  # for a Wait on it
            _record_published(task)

    # --- restart ---------------------------------------------------------------------

    async def load(self) -> None:
        """Find the shims of a previous runtimed, reconnect, rebuild the table."""
        await asyncio.to_thread(self._empty_trash)
        for namespace, id, bundle in self.shims.scan():
            info = read_info(bundle)
            if info is None:
                log.warning("%s: not a complete bundle; removing", bundle)
                await asyncio.to_thread(remove_bundle, bundle)
                continue
            published, init_exit, init_pid, size = _read_published(bundle)
            try:
                address = (bundle / "address").read_text().strip()
            except FileNotFoundError:
                address = ""
            if not address or shim_running(bundle) is False:  # (cannot tell: connect)
                log.warning("%s/%s: shim is gone", namespace, id)
                task = Task(namespace, id, bundle, ShimClient(id, "unix:///dev/null", bundle),
                            info, published, init_exit, init_pid, record_size=size)
                await self._shim_died(task)
                continue
            try:
                shim = await self.shims.connect(id, address, bundle)
            except RuntimedError as exc:  # alive: keep it; the relay retries until it answers
                log.warning("%s/%s: shim alive but not answering yet (%s)", namespace, id, exc)
                shim = ShimClient(id, address, bundle)
                pid = shim_pid_file(bundle)  # the one working in it, to wait for
                shim.pid = pid if shim_running(bundle, pid) is not False else 0
            task = Task(namespace, id, bundle, shim, info, published, init_exit, init_pid,
                        record_size=size)
            try:
                await shim.call("State", shim_pb2.StateRequest(id=id), CONNECT_TIMEOUT)
            except NotFound:
                # deleted, or its create cut short, and runtimed went down before it shut
                # the shim down: finish that, the runtime's leftovers (a created init and
                # its cgroup) removed once the shim, and any create it ran, are over
                log.info("%s/%s: task deleted or never created; removing its shim and bundle",
                         namespace, id)
                left = read_after(bundle / OUTBOX, published)
                task.forwarder = asyncio.ensure_future(self._relay(task))
                await self._wait_published(task, left[-1]["seq"] if left else published)
                task.removing = True
                await self._stop_relay(task)
                await self.shims.dispose(shim, SHIM_EXIT_TIMEOUT)
                await self.shims.cleanup(info, bundle)
                continue
            except RuntimedError as exc:
                log.warning("%s/%s: shim state: %s", namespace, id, exc)
            self.tasks[(namespace, id)] = task
            task.forwarder = asyncio.ensure_future(self._relay(task))
            log.info("%s/%s: reconnected to shim at %s", namespace, id, address)

    async def close(self) -> None:
        """runtimed stops: the shims (and their containers) keep running; the zygote goes.
        Shims of deleted tasks still exiting are waited for (a restart would kill them)."""
        for task in list(self.tasks.values()):
            await self._stop_relay(task)
            await task.shim.close()
        if self._removals:
            await asyncio.wait(list(self._removals.values()), timeout=SHIM_EXIT_TIMEOUT + 5)
        self.outboxes.close()
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


def _record(info: BundleInfo, published: int, init_exit: bool, init_pid: int) -> bytes:
    """runtimed's record of a bundle (`runtimed.json`): what it needs to clean up without
    the shim, and what it has published (the shim trims its outbox by `seq`). One file:
    until session 13 the published part was a file of its own, `published`."""
    return json.dumps({**info.__dict__, "seq": published, "init_exit": init_exit,
                       "pid": init_pid}).encode()


def _record_published(task: Task) -> None:
    """Rewrite the record in place: one pwrite, padded with spaces to the longest record
    written before (JSON allows them), which a reader sees whole, where temp + rename cost
    a journal transaction per event; through one fd while the relay runs (the same file
    after Delete moved the bundle to the trash). A write that fails (out of fds, say) is
    logged and loses nothing: the event is published, the worst case is that a restart
    publishes it again, and the shim, which trims its outbox by this record, only trims
    later."""
    data = _record(task.info, task.published, task.init_exit_published, task.init_pid)
    task.record_size = max(task.record_size, len(data))
    try:
        fd = task.record_fd if task.record_fd >= 0 else _open_record(task.bundle)
        try:
            os.pwrite(fd, data.ljust(task.record_size), 0)
        finally:
            if fd != task.record_fd:
                os.close(fd)
    except FileNotFoundError:  # the bundle is gone
        pass
    except OSError as exc:
        log.warning("%s/%s: published not recorded (seq %d): %s", task.namespace, task.id,
                    task.published, exc)


def _open_record(bundle: Path) -> int:
    return os.open(bundle / RECORD, os.O_WRONLY | os.O_CLOEXEC)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_published(bundle: Path) -> tuple[int, bool, int, int]:
    """(seq, init's exit published, init's pid, the record's length) of runtimed's record;
    a bundle from before session 13 keeps the published part in a file of its own."""
    for name in (RECORD, "published"):
        try:
            text = (bundle / name).read_text()
            data = json.loads(text)
            if "seq" in data:
                return (int(data["seq"]), bool(data.get("init_exit")), int(data.get("pid") or 0),
                        len(text) if name == RECORD else 0)
        except (FileNotFoundError, ValueError, TypeError):
            pass
    return 0, False, 0, 0


def _init_pid(task: Task) -> int:
    """The init's pid as its published /tasks/create said; else `init.pid`, which a shim
    of a runtime's command line (runc) writes, and shims before session 12 always did."""
    if task.init_pid:
        return task.init_pid
    try:
        return int((task.bundle / "init.pid").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _unmount_rootfs(rootfs: Path) -> None:
    """Unmount everything stacked at `rootfs` (a lazy unmount takes submounts along), then
    remove the empty mount point. Raises Unavailable while something stays mounted."""
    path = os.fspath(rootfs).encode()
    for _ in range(64):
        if mounts._libc.umount2(path, mounts.UMOUNT_NOFOLLOW | mounts.MNT_DETACH) != 0:
            break
    try:
        rootfs.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if mounts.is_mountpoint(rootfs):
            raise Unavailable(f"{rootfs} is still mounted: bundle kept") from exc
        raise


def _shim_pidfd(task: Task) -> int | None:
    """A pidfd for the task's shim; -1 when it is gone (or its pid is some other process's
    by now: the process must work in the bundle); None when none can be opened or that
    cannot be told (out of fds). The pid the shim wrote in its bundle first (the long-lived process that holds
    the container), else the one its Connect reported."""
    for pid in dict.fromkeys((shim_pid_file(task.bundle), task.shim.pid)):
        if pid <= 0:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except OSError as exc:
            log.warning("%s/%s: no pidfd for shim %d: %s; polling whether it runs",
                        task.namespace, task.id, pid, exc)
            return None
        running = shim_running(task.bundle, pid)
        if running:
            return pidfd
        os.close(pidfd)
        if running is None:
            log.warning("%s/%s: cannot tell whether shim %d runs; polling", task.namespace,
                        task.id, pid)
            return None
    if shim_running(task.bundle) is None:  # its pid file could not be read
        return None
    return -1


async def _after_both(first: asyncio.Future, second: asyncio.Future) -> None:
    """Done once both are (a removal tracked while another of the same id was pending)."""
    await asyncio.wait({first, second})
