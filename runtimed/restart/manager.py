"""The daemon's restart manager: brings containers back after their task exits, by their
restart policy label, and removes `autoremove` containers when they exit.

It lives in runtimed because the client that ran `ctl run -d` is gone by then. It follows
the exchange's `/tasks/start` and `/tasks/exit` events (subscribed when the daemon is
built, so exits that shims report while runtimed reconnects are not missed). To restart,
it deletes the exited task and creates and starts a new one on the container's snapshot,
with the log URI from its labels, after docker's backoff. When runtimed starts, it also
restarts the policy containers whose tasks are gone (docker restarts them when dockerd
starts). The policy rules and label names are in `runtimed.restart.policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from datetime import UTC, datetime

from runtimed import logfile
from runtimed.api.containerd.types.task import task_pb2
from runtimed.errors import NotFound, RuntimedError
from runtimed.metadata.containers import AnyValue, Container
from runtimed.restart import policy as rp
from runtimed.runtime.tasks import Stdio

log = logging.getLogger("runtimed.restart")

STOPPED = task_pb2.STOPPED
SIGKILL = 9


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class RestartManager:
    def __init__(self, namespaces, containers, tasks, snapshotters, exchange, volumes=None):
        self.namespaces = namespaces
        self.containers = containers
        self.tasks = tasks
        self.snapshotters = snapshotters
        self.exchange = exchange
        self.volumes = volumes
        self._sub = exchange.subscribe(['topic=="/tasks/exit"', 'topic=="/tasks/start"'])
        self._backoff: dict[tuple[str, str], rp.Backoff] = {}
        self._started: dict[tuple[str, str], float] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._jobs: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        """Start hook (after the task table is loaded)."""
        self._watcher = asyncio.ensure_future(self._watch())
        self._spawn(self._restore(at_boot=True))

    async def close(self) -> None:
        for job in [self._watcher, *self._jobs]:
            if job is not None:
                job.cancel()
        self.exchange.unsubscribe(self._sub)

    def _spawn(self, coro) -> None:
        job = asyncio.ensure_future(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _watch(self) -> None:
        while True:
            try:
                async for event in self._sub:
                    message = event.decoded()
                    if message is None:
                        continue
                    key = (event.namespace, message.container_id)
                    if event.topic == "/tasks/start":
                        self._started[key] = time.monotonic()
                    elif message.id in ("", message.container_id):  # init, not an exec
                        self._spawn(self._on_exit(*key, message.exit_status))
            except RuntimedError as exc:  # fell behind: subscribe again and re-check all
                log.warning("restart manager missed events (%s); rescanning", exc)
                self.exchange.unsubscribe(self._sub)
                self._sub = self.exchange.subscribe(['topic=="/tasks/exit"', 'topic=="/tasks/start"'])
                self._spawn(self._restore())

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _get(self, namespace: str, container_id: str) -> Container | None:
        try:
            return self.containers.get(namespace, container_id)
        except NotFound:
            return None

    async def _label(self, namespace: str, container_id: str, labels: dict[str, str]) -> None:
        """A metadata write (fsync'd sqlite), off the event loop."""
        record = Container(id=container_id, runtime_name="", spec=AnyValue(), labels=labels)
        with contextlib.suppress(NotFound):
            await asyncio.to_thread(self.containers.update, namespace, record,
                                    [f"labels.{k}" for k in labels])

    async def _on_exit(self, namespace: str, container_id: str, exit_status: int) -> None:
        key = (namespace, container_id)
        async with self._lock(key):
            container = self._get(namespace, container_id)
            if container is None:  # removed (maybe while the manager was starting it again)
                await self._delete_task(namespace, container_id)
                self._backoff.pop(key, None)
                self._started.pop(key, None)
                return
            labels = container.labels
            if rp.autoremove(labels):
                await self._autoremove(namespace, container)
                return
            if rp.policy_of(labels).name == "no" or await self._running(namespace, container.id):
                return  # the exit of a task that was already replaced
            ran = time.monotonic() - self._started.pop(key, time.monotonic())
            await self._restart(namespace, container, exit_status, ran, at_boot=False)

    async def _restart(self, namespace: str, container: Container, exit_status: int,
                       ran: float, at_boot: bool) -> None:
        """Decide, wait out the backoff, start; a start that fails counts as a failed run."""
        key = (namespace, container.id)
        labels = container.labels
        while True:
            policy = rp.policy_of(labels)
            count = rp.restart_count(labels)
            stopped = rp.stopped_by_user(labels)
            exit_labels = {rp.LABEL_EXIT_CODE: str(exit_status), rp.LABEL_EXITED_AT: _now()}
            if not rp.should_restart(policy, exit_status, count, stopped, at_boot):
                await self._label(namespace, container.id, {**exit_labels, rp.LABEL_RESTARTING: ""})
                return
            delay = self._backoff.setdefault(key, rp.Backoff()).next(ran)
            await self._label(namespace, container.id, {
                **exit_labels, rp.LABEL_COUNT: str(count + 1), rp.LABEL_RESTARTING: "true",
                **({rp.LABEL_STOPPED: ""} if stopped else {}),
            })
            await self._delete_task(namespace, container.id)
            log.info("%s/%s exited with %d; restart %d (%s) in %.1fs", namespace, container.id,
                     exit_status, count + 1, policy, delay)
            await asyncio.sleep(delay)
            current = self._get(namespace, container.id)
            if current is None:
                return
            if rp.stopped_by_user(current.labels) and not (at_boot and policy.name == "always"):
                await self._label(namespace, container.id, {rp.LABEL_RESTARTING: ""})
                return
            try:
                await self._start_task(namespace, current)
                return
            except RuntimedError as exc:
                log.warning("%s/%s: restart failed: %s", namespace, container.id, exc)
                await self._delete_task(namespace, container.id)
                current = self._get(namespace, container.id)
                if current is None:
                    return
                labels, exit_status, ran = current.labels, 127, 0.0
            at_boot = False

    async def _start_task(self, namespace: str, container: Container) -> None:
        rootfs = []
        if container.snapshot_key:
            snapshotter = self.snapshotters[container.snapshotter or "overlayfs"]
            rootfs = await asyncio.to_thread(snapshotter.mounts, namespace, container.snapshot_key)
        uri = rp.log_uri(container.labels)
        if uri.startswith("file://"):
            path = uri[len("file://"):].split("?", 1)[0]
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            terminal = bool(json.loads(container.spec.value).get("process", {}).get("terminal"))
        except ValueError:
            terminal = False
        stdio = Stdio(stdout=uri, stderr="" if terminal else uri, terminal=terminal)
        await self.tasks.create(namespace, container.id, rootfs, stdio)
        await self.tasks.start(namespace, container.id)
        await self._label(namespace, container.id, {rp.LABEL_RESTARTING: "", rp.LABEL_STARTED_AT: _now()})
        current = self._get(namespace, container.id)
        if current is None or rp.stopped_by_user(current.labels):  # stopped or removed meanwhile
            with contextlib.suppress(RuntimedError):
                await self.tasks.kill(namespace, container.id, "", SIGKILL, True)

    async def _running(self, namespace: str, container_id: str) -> bool:
        if (namespace, container_id) not in self.tasks.tasks:
            return False
        try:
            return (await self.tasks.state(namespace, container_id)).status != STOPPED
        except RuntimedError:
            return False

    async def _delete_task(self, namespace: str, container_id: str) -> None:
        if (namespace, container_id) not in self.tasks.tasks:
            return
        try:
            await self.tasks.delete(namespace, container_id)
        except NotFound:
            pass
        except RuntimedError as exc:
            log.warning("%s/%s: cannot delete the exited task: %s", namespace, container_id, exc)

    async def _autoremove(self, namespace: str, container: Container) -> None:
        """`run --rm -d`: the task, the snapshot and the log, then the record, so that a
        container gone from `ps` has taken them with it and one that a kill -9 interrupts
        is still listed (and `_restore` finishes the job); then its anonymous volumes."""
        await self._delete_task(namespace, container.id)
        if container.snapshot_key:
            snapshotter = self.snapshotters.get(container.snapshotter or "overlayfs")
            if snapshotter is not None:
                with contextlib.suppress(RuntimedError):
                    await asyncio.to_thread(snapshotter.remove, namespace, container.snapshot_key)
        with contextlib.suppress(OSError):  # PATH and its rotated files (docs/cli.md)
            logfile.remove_set(rp.log_uri(container.labels))
        try:
            self.containers.delete(namespace, container.id)
        except NotFound:
            return  # a client removed it first
        if self.volumes is not None:  # after the record: a volume in use is not removed
            for name in filter(None, container.labels.get("io.runtimed.volumes.anonymous", "").split(",")):
                with contextlib.suppress(RuntimedError):
                    await asyncio.to_thread(self.volumes.remove, namespace, name)
        log.info("%s/%s exited and was removed (autoremove)", namespace, container.id)

    async def _restore(self, at_boot: bool = False) -> None:
        """At daemon start, and after missed events: policy and autoremove containers that
        were started once and whose task is stopped with its exit published, or gone.
        A task gone is only trusted at boot for autoremove: later it may be one that a
        client is starting right now."""
        for ns in self.namespaces.list():
            for container in self.containers.list(ns.name):
                labels = container.labels
                autoremove = rp.autoremove(labels)
                if not autoremove and rp.policy_of(labels).name == "no":
                    continue
                if rp.LABEL_COUNT not in labels and labels.get(rp.CONTAINERD_STATUS) != "running":
                    continue  # created, never started
                key = (ns.name, container.id)
                task = self.tasks.tasks.get(key)
                if task is not None and not task.init_exit_published:
                    continue  # running, or its exit event is on the way
                if task is None and autoremove and not at_boot:
                    continue
                exit_status = int(labels.get(rp.LABEL_EXIT_CODE) or 0)
                if task is not None:
                    with contextlib.suppress(RuntimedError):
                        state = await self.tasks.state(ns.name, container.id)
                        if state.status != STOPPED:
                            continue
                        exit_status = state.exit_status
                self._spawn(self._restore_one(ns.name, container.id, exit_status))

    async def _restore_one(self, namespace: str, container_id: str, exit_status: int) -> None:
        async with self._lock((namespace, container_id)):
            container = self._get(namespace, container_id)
            task = self.tasks.tasks.get((namespace, container_id))
            if container is None or (task is not None and not task.init_exit_published):
                return
            if rp.autoremove(container.labels):  # its exit was missed
                await self._autoremove(namespace, container)
                return
            await self._restart(namespace, container, exit_status, 0.0, at_boot=True)

