"""Containers and tasks, in the RPC order containerd's client uses.

create: resolve the image → make sure its snapshot chain exists → Snapshots.Prepare(key =
container id, parent = chain ID) → Containers.Create (spec as JSON in an Any).
run: create → Tasks.Create (rootfs mounts: those Prepare answered, carried by the record
`create` returns, else Snapshots.Mounts; stdio) → Wait (before
Start, so the exit is never missed) → Start. remove: Tasks.Delete if a task is left →
Containers.Delete → Snapshots.Remove.
"""

from __future__ import annotations

import json
import signal as signals
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ctl.client.types import Container, ExitStatus, Process, timestamp
from runtimed.errors import FailedPrecondition, InvalidArgument, NotFound, RuntimedError

if TYPE_CHECKING:  # imported where used: `ctl ps`, `exec` and `rm` need none of them
    from concurrent.futures import Future

    from ctl.client.cio import Stdio
    from ctl.client.images import ResolvedImage
    from ctl.client.monitor import Stats
    from runtimed.oci.spec import ImageConfig, SpecOptions

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
DEFAULT_RUNTIME = "io.containerd.runc.v2"
RUNC_OPTIONS_TYPE_URL = "containerd.runc.v1.Options"
DEFAULT_SNAPSHOTTER = "overlayfs"
# lists the anonymous volumes made for a container (removed by `rm -v`, `run --rm`)
LABEL_ANONYMOUS = "io.runtimed.volumes.anonymous"


def _any(type_url: str, value: dict):
    from google.protobuf import any_pb2

    return any_pb2.Any(type_url=type_url, value=json.dumps(value).encode())


def parse_signal(value: str | int) -> int:
    """`9`, `KILL`, `SIGKILL`, `sigterm` → the signal number."""
    if isinstance(value, int):
        return value
    text = value.strip().upper()
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise InvalidArgument(f"invalid signal: {value}") from None


@dataclass
class CreateOptions:
    """What `containers.create` needs beyond the image and the spec options."""

    labels: dict[str, str] = field(default_factory=dict)
    snapshotter: str = DEFAULT_SNAPSHOTTER
    runtime: str = DEFAULT_RUNTIME
    # the OCI runtime command (runc, crun); empty: the daemon's default
    runtime_binary: str = ""
    platform: str | None = None


class ContainersAPI:
    def __init__(self, client):
        self._client = client

    @property
    def _stub(self):
        return self._client._stub("containers")

    def get(self, container_id: str) -> Container:
        pb = self._stub.pb
        try:
            return Container.from_pb(self._stub.Get(pb.GetContainerRequest(id=container_id)).container)
        except NotFound:
            raise NotFound(f"no such container: {container_id}") from None

    def list(self, filters: list[str] | None = None) -> list[Container]:
        pb = self._stub.pb
        response = self._stub.List(pb.ListContainersRequest(filters=filters or []))
        return [Container.from_pb(c) for c in response.containers]

    def resolve_id(self, name_or_prefix: str) -> str:
        """A full id from an id, or a unique prefix of one (as docker accepts)."""
        return self.resolve(name_or_prefix).id

    def resolve(self, name_or_prefix: str) -> Container:
        """The container named by an id, or by a unique prefix of one."""
        try:
            return self.get(name_or_prefix)
        except NotFound:
            pass
        matches = [c for c in self.list() if c.id.startswith(name_or_prefix)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(c.id for c in matches)
            raise InvalidArgument(f"{name_or_prefix!r} matches several containers: {ids}")
        raise NotFound(f"no such container: {name_or_prefix}")

    def create(
        self, container_id: str, image: str | ResolvedImage, spec_options: SpecOptions | None = None,
        options: CreateOptions | None = None,
    ) -> Container:
        """Create the container record and its writable snapshot; nothing runs yet."""
        from ctl.client.images import ResolvedImage
        from runtimed import identifiers
        from runtimed.oci.spec import SpecOptions, build_spec

        identifiers.validate(container_id, "container")
        spec_options = spec_options or SpecOptions()
        options = options or CreateOptions()
        images = self._client.images
        resolved = image if isinstance(image, ResolvedImage) else images.resolve(image, options.platform)
        image_config = resolved.runtime_config
        volumes = self._resolve_volumes(spec_options, image_config)
        if volumes.anonymous:
            options.labels = {**options.labels, LABEL_ANONYMOUS: ",".join(volumes.anonymous)}
        wants_lookup = _needs_passwd(spec_options.user if spec_options.user is not None else image_config.user)
        reader = (lambda path: images.read_file(resolved, path)) if wants_lookup else None
        spec = build_spec(container_id, self._client.namespace, image_config, spec_options, reader)

        snaps = self._client._stub("snapshots")
        pb = self._stub.pb
        with self._client.lease():
            try:
                prepared = self._prepare(resolved, options.snapshotter, container_id)
            except BaseException:
                self._remove_volumes(volumes.anonymous)
                raise
            try:
                for name, path in volumes.fill:
                    self._client.volumes.populate(name, options.snapshotter, container_id, path)
                record = pb.Container(
                    id=container_id,
                    image=resolved.image.name,
                    labels=options.labels,
                    spec=_any(SPEC_TYPE_URL, spec),
                    snapshotter=options.snapshotter,
                    snapshot_key=container_id,
                )
                record.runtime.name = options.runtime
                if options.runtime_binary:
                    from runtimed.api.containerd.runtime.v2.runc.options import oci_pb2

                    record.runtime.options.type_url = RUNC_OPTIONS_TYPE_URL
                    record.runtime.options.value = oci_pb2.Options(
                        binary_name=options.runtime_binary
                    ).SerializeToString()
                created = self._stub.Create(pb.CreateContainerRequest(container=record)).container
            except BaseException:
                try:
                    snaps.Remove(snaps.pb.RemoveSnapshotRequest(snapshotter=options.snapshotter, key=container_id))
                except NotFound:
                    pass
                self._remove_volumes(volumes.anonymous)
                raise
        return Container.from_pb(created, rootfs=prepared.mounts)

    def _prepare(self, resolved: ResolvedImage, snapshotter: str, key: str):
        """Snapshots.Prepare on the image's snapshot, unpacking the image first if that is
        missing: asked only after a NotFound, as the image is nearly always unpacked (one
        round trip less than a Stat before every create)."""
        snaps = self._client._stub("snapshots")
        request = snaps.pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=resolved.chain_id)
        try:
            return snaps.Prepare(request)
        except NotFound:
            images = self._client.images
            if images.is_unpacked(resolved, snapshotter):
                raise
            images.unpack(resolved, snapshotter)
        return snaps.Prepare(request)

    def _remove_volumes(self, names: list[str]) -> None:
        for name in names:
            try:
                self._client.volumes.remove(name, force=True)
            except NotFound:
                pass

    def _resolve_volumes(self, spec_options: SpecOptions, image: ImageConfig) -> _Volumes:
        """Named and anonymous volume mounts (and the image's VOLUMEs) become binds of the
        volumes' directories; fresh ones are filled from the image, as Docker does."""
        from runtimed.oci.spec import Mount

        result = _Volumes()
        wanted = [m for m in spec_options.mounts if m.type == "volume"]
        taken = {m.destination for m in spec_options.mounts}
        wanted += [Mount(destination=path, type="volume") for path in image.volumes if path not in taken]
        if not wanted:
            return result
        resolved = []
        for m in spec_options.mounts:
            if m.type != "volume":
                resolved.append(m)
        for m in wanted:
            if m.source:
                volume = self._client.volumes.create(m.source)
            else:
                volume = self._client.volumes.create(anonymous=True)
                result.anonymous.append(volume.name)
            result.fill.append((volume.name, m.destination))
            resolved.append(Mount(destination=m.destination, source=volume.mountpoint, type="bind",
                                  readonly=m.readonly))
        spec_options.mounts = resolved
        return result

    def update_labels(self, container_id: str, labels: dict[str, str]) -> Container:
        return self.start_update_labels(container_id, labels).result()

    def start_update_labels(self, container_id: str, labels: dict[str, str]):
        """`update_labels`, with the request sent now: `.result()` is the record."""
        pb = self._stub.pb
        record = pb.Container(id=container_id, labels=labels)
        request = pb.UpdateContainerRequest(container=record)
        request.update_mask.paths.extend(f"labels.{k}" for k in labels)
        return self._stub.Update.start(request).then(lambda response: Container.from_pb(response.container))

    def remove(self, container_id: str, force: bool = False, volumes: bool = False, *,
               container: Container | None = None) -> None:
        """Delete the container and its snapshot; with `force`, kill and delete its task;
        with `volumes`, the anonymous volumes made for it. `container`: its record, when
        the caller has it at hand (saves a round trip)."""
        if container is None or container.id != container_id:
            container = self.get(container_id)
        from runtimed.restart import policy as rp

        restarts = rp.policy_of(container.labels).name != "no"
        tasks = self._client.tasks
        task = None
        try:
            if force and not restarts:
                # a task that has exited (`run --rm`, the usual case) goes in one call; a
                # live one is refused, looked up and killed below; any other error (the
                # daemon unavailable, a deadline) is the caller's
                try:
                    tasks.delete(container_id)
                except RuntimedError as exc:
                    if not _refused_while_live(exc):
                        raise
                    task = tasks.get(container_id)
            else:
                task = tasks.get(container_id)
        except NotFound:
            task = None
        if task is not None:
            if task.status not in ("STOPPED", "CREATED") and not force:
                raise FailedPrecondition(
                    f"container {container_id} is {task.status.lower()}: stop it first or use force"
                )
            if task.status != "STOPPED":
                if restarts:  # the daemon must not restart it
                    self.update_labels(container_id, {rp.LABEL_STOPPED: "true"})
                if task.status == "PAUSED":
                    tasks.resume(container_id)
                waiter = tasks.wait_async(container_id)
                try:
                    tasks.kill(container_id, signals.SIGKILL, all=True)
                except NotFound:
                    pass
                waiter.result(timeout=30)
            try:
                tasks.delete(container_id)
            except NotFound:
                pass
        pb = self._stub.pb
        self._stub.Delete(pb.DeleteContainerRequest(id=container_id))
        if container.snapshot_key:
            snaps = self._client._stub("snapshots")
            try:
                snaps.Remove(
                    snaps.pb.RemoveSnapshotRequest(
                        snapshotter=container.snapshotter or DEFAULT_SNAPSHOTTER, key=container.snapshot_key
                    )
                )
            except NotFound:
                pass
        if volumes:
            for name in filter(None, container.labels.get(LABEL_ANONYMOUS, "").split(",")):
                try:
                    self._client.volumes.remove(name)
                except NotFound:
                    pass


def _refused_while_live(exc: RuntimedError) -> bool:
    """Tasks.Delete's answer for a task whose process has not exited: FAILED_PRECONDITION
    from runtimed, UNKNOWN ("cannot delete a running process") from containerd's runc shim."""
    return isinstance(exc, FailedPrecondition) or exc.code == "UNKNOWN"


@dataclass
class _Volumes:
    """The volumes `create` made or will fill for a container."""

    anonymous: list[str] = field(default_factory=list)
    fill: list[tuple[str, str]] = field(default_factory=list)  # (volume, path in the image)


def _needs_passwd(user: str) -> bool:
    """Numeric `uid:gid` needs no lookup; a name, or a bare uid (its gid), does."""
    if not user:
        return False
    name, _, group = user.partition(":")
    return not (name.isdigit() and group.isdigit())


class TasksAPI:
    def __init__(self, client):
        self._client = client

    @property
    def _stub(self):
        return self._client._stub("tasks")

    def create(self, container_id: str, stdio: Stdio | None = None, *,
               container: Container | None = None) -> Process:
        """Mount the container's snapshot and start its shim; the process waits for start.
        `container`: its record, when the caller has it at hand (saves a round trip; one
        from `containers.create` carries its snapshot's mounts, which saves another)."""
        if stdio is None:
            from ctl.client.cio import Stdio

            stdio = Stdio.null()
        if container is None or container.id != container_id:
            container = self._client.containers.get(container_id)
        pb = self._stub.pb
        request = pb.CreateTaskRequest(
            container_id=container_id, stdin=stdio.stdin, stdout=stdio.stdout,
            stderr=stdio.stderr, terminal=stdio.terminal,
        )
        if container.rootfs is not None:  # the record came from `containers.create`
            for m in container.rootfs:
                request.rootfs.add(type=m.type, source=m.source, target=m.target, options=m.options)
        elif container.snapshot_key:
            snaps = self._client._stub("snapshots")
            request.rootfs.extend(snaps.Mounts(
                snaps.pb.MountsRequest(snapshotter=container.snapshotter, key=container.snapshot_key)
            ).mounts)
        response = self._stub.Create(request)
        return Process(container_id, container_id, response.pid, "CREATED", terminal=stdio.terminal)

    def start(self, container_id: str, exec_id: str = "") -> int:
        pb = self._stub.pb
        return self._stub.Start(pb.StartRequest(container_id=container_id, exec_id=exec_id)).pid

    def wait(self, container_id: str, exec_id: str = "", timeout: float | None = None) -> ExitStatus:
        pb = self._stub.pb
        response = self._stub.Wait(pb.WaitRequest(container_id=container_id, exec_id=exec_id), timeout=timeout)
        return ExitStatus(response.exit_status, timestamp(response.exited_at))

    def wait_async(self, container_id: str, exec_id: str = "") -> Future:
        """Wait in the background: call before `start` so a fast exit is never missed.

        A daemon thread, not an executor: a wait that never returns (the process was never
        started) must not keep the interpreter from exiting."""
        from concurrent.futures import Future

        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self.wait(container_id, exec_id))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        threading.Thread(target=run, name=f"wait-{container_id}", daemon=True).start()
        return future

    def kill(self, container_id: str, signal: int | str = signals.SIGTERM, *, all: bool = False,
             exec_id: str = "") -> None:
        pb = self._stub.pb
        self._stub.Kill(pb.KillRequest(
            container_id=container_id, exec_id=exec_id, signal=parse_signal(signal), all=all,
        ))

    def delete(self, container_id: str) -> ExitStatus:
        pb = self._stub.pb
        response = self._stub.Delete(pb.DeleteTaskRequest(container_id=container_id))
        return ExitStatus(response.exit_status, timestamp(response.exited_at))

    def delete_process(self, container_id: str, exec_id: str) -> ExitStatus:
        pb = self._stub.pb
        response = self._stub.DeleteProcess(pb.DeleteProcessRequest(container_id=container_id, exec_id=exec_id))
        return ExitStatus(response.exit_status, timestamp(response.exited_at))

    def get(self, container_id: str, exec_id: str = "") -> Process:
        return self.start_get(container_id, exec_id).result()

    def start_get(self, container_id: str, exec_id: str = ""):
        """`get`, with the request sent now: `.result()` is the Process (or the error)."""
        pb = self._stub.pb
        request = pb.GetRequest(container_id=container_id, exec_id=exec_id)
        return self._stub.Get.start(request).then(lambda response: Process.from_pb(response.process))

    def list(self) -> list[Process]:
        pb = self._stub.pb
        return [Process.from_pb(p) for p in self._stub.List(pb.ListTasksRequest()).tasks]

    def exec(
        self, container_id: str, exec_id: str, args: list[str], *, stdio: Stdio | None = None,
        env: list[str] = (), cwd: str | None = None, user: str | None = None,
        container: Container | None = None,
    ) -> None:
        """Add a process to a running task (started by `start(container_id, exec_id)`).
        `container`: its record, when the caller has it at hand (saves a round trip)."""
        from runtimed.oci.process import exec_process, resolve_user

        if stdio is None:
            from ctl.client.cio import Stdio

            stdio = Stdio.null()
        if container is None or container.id != container_id:
            container = self._client.containers.get(container_id)
        resolved_user = None
        if user:
            reader = None
            if _needs_passwd(user) and container.image:
                images = self._client.images
                resolved = images.resolve(container.image)
                reader = lambda path: images.read_file(resolved, path)  # noqa: E731
            resolved_user = resolve_user(user, reader)
        process = exec_process(
            container.spec.get("process") or {}, args, env=env, cwd=cwd,
            user=resolved_user, terminal=stdio.terminal,
        )
        pb = self._stub.pb
        self._stub.Exec(pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, stdin=stdio.stdin, stdout=stdio.stdout,
            stderr=stdio.stderr, terminal=stdio.terminal, spec=_any(PROCESS_TYPE_URL, process),
        ))

    def pause(self, container_id: str) -> None:
        pb = self._stub.pb
        self._stub.Pause(pb.PauseTaskRequest(container_id=container_id))

    def resume(self, container_id: str) -> None:
        pb = self._stub.pb
        self._stub.Resume(pb.ResumeTaskRequest(container_id=container_id))

    def resize(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        pb = self._stub.pb
        self._stub.ResizePty(pb.ResizePtyRequest(
            container_id=container_id, exec_id=exec_id, width=width, height=height,
        ))

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        pb = self._stub.pb
        self._stub.CloseIO(pb.CloseIORequest(container_id=container_id, exec_id=exec_id, stdin=True))

    def pids(self, container_id: str) -> list[int]:
        pb = self._stub.pb
        return [p.pid for p in self._stub.ListPids(pb.ListPidsRequest(container_id=container_id)).processes]

    def metrics(self, container_ids: list[str] | None = None) -> list[Stats]:
        """Memory, CPU and pids from the task's cgroup (v1 or v2 metrics, decoded)."""
        pb = self._stub.pb
        filters = [f"id=={i}" for i in container_ids] if container_ids else []
        response = self._stub.Metrics(pb.MetricsRequest(filters=filters))
        return [_stats(m) for m in response.metrics]

    def close(self) -> None:
        """Nothing to release: background waits are daemon threads."""


def _stats(metric) -> Stats:
    from ctl.client.decode import decode_any
    from ctl.client.monitor import Stats  # noqa: F811 - the annotation's, at run time

    data = decode_any(metric.data)
    stats = Stats(container_id=metric.id, type_url=metric.data.type_url)
    if "cgroups.v1" in metric.data.type_url:
        cpu = (data.get("cpu") or {}).get("usage") or {}
        memory = data.get("memory") or {}
        usage = memory.get("usage") or {}
        stats.cpu_usage_ns = int(cpu.get("total") or 0)
        stats.memory_usage = int(usage.get("usage") or 0) - int(memory.get("total_inactive_file") or memory.get("totalInactiveFile") or 0)
        stats.memory_limit = int(usage.get("limit") or 0)
        pids = data.get("pids") or {}
    else:
        cpu = data.get("cpu") or {}
        memory = data.get("memory") or {}
        stats.cpu_usage_ns = int(cpu.get("usage_usec") or cpu.get("usageUsec") or 0) * 1000
        stats.memory_usage = int(memory.get("usage") or 0) - int(memory.get("inactive_file") or memory.get("inactiveFile") or 0)
        stats.memory_limit = int(memory.get("usage_limit") or memory.get("usageLimit") or 0)
        pids = data.get("pids") or {}
    stats.memory_usage = max(stats.memory_usage, 0)
    stats.pids = int(pids.get("current") or 0)
    stats.pids_limit = int(pids.get("limit") or 0)
    return stats


class EventStream:
    """Events as they arrive; `cancel()` (from any thread) ends the iteration."""

    def __init__(self, client, filters: list[str] | None):
        stub = client._stub("events")
        self._call = stub.Subscribe(stub.pb.SubscribeRequest(filters=filters or []))

    def __iter__(self) -> Iterator:
        from ctl.client.decode import decode_any
        from ctl.client.monitor import Event

        for envelope in self._call:
            yield Event(
                timestamp=timestamp(envelope.timestamp),
                namespace=envelope.namespace,
                topic=envelope.topic,
                type_url=envelope.event.type_url,
                payload=decode_any(envelope.event),
            )

    def cancel(self) -> None:
        self._call.cancel()
