"""`Client`: the entry point of the library.

    from ctl.client import Client

    with Client("/run/runtimed/runtimed.sock", namespace="default") as c:
        c.images.import_archive("busybox.tar")
        with c.run("hello", "busybox", SpecOptions(args=["echo", "hi"])) as box:
            print(box.wait().code, box.output())

Every method raises the typed errors of `runtimed.errors` (NotFound, AlreadyExists, ...),
never gRPC exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ctl.client.rpc import SERVICES, Connection, Stub
from runtimed.errors import NotFound

if TYPE_CHECKING:
    from ctl.client.cio import Attachment, FifoSet
    from ctl.client.containers import ContainersAPI, CreateOptions, EventStream, TasksAPI
    from ctl.client.images import ImagesAPI
    from ctl.client.types import Container, ExitStatus
    from ctl.client.volumes import VolumesAPI
    from runtimed.oci.spec import SpecOptions

DEFAULT_ADDRESS = "/run/runtimed/runtimed.sock"


class Client:
    """A connection to runtimed (or containerd) acting in one containerd namespace."""

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = "default", *,
                 _connection: Connection | None = None):
        self.address = address
        self.namespace = namespace
        self._connection = _connection or Connection(address)
        self._owns_connection = _connection is None
        self._local = threading.local()  # the lease of `with client.lease()`, per thread
        self._stubs: dict[tuple[str, str], Stub] = {}

    # the APIs are built on first use: `ctl version` need not import what `ctl run` does

    @functools.cached_property
    def images(self) -> ImagesAPI:
        from ctl.client.images import ImagesAPI

        return ImagesAPI(self)

    @functools.cached_property
    def containers(self) -> ContainersAPI:
        from ctl.client.containers import ContainersAPI

        return ContainersAPI(self)

    @functools.cached_property
    def tasks(self) -> TasksAPI:
        from ctl.client.containers import TasksAPI

        return TasksAPI(self)

    @functools.cached_property
    def volumes(self) -> VolumesAPI:
        from ctl.client.volumes import VolumesAPI

        return VolumesAPI(self)

    @property
    def lease_id(self) -> str | None:
        """The lease calls made in this thread run under (one client serves many threads)."""
        return getattr(self._local, "lease_id", None)

    @lease_id.setter
    def lease_id(self, value: str | None) -> None:
        self._local.lease_id = value

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if "tasks" in self.__dict__:
            self.tasks.close()
        if self._owns_connection:
            self._connection.close()

    def with_namespace(self, namespace: str) -> Client:
        """A view of the same connection in another namespace."""
        return Client(self.address, namespace, _connection=self._connection)

    def _stub(self, service: str) -> Stub:
        return self.service(*SERVICES[service])

    def service(self, module: str, name: str) -> Stub:
        """A stub for an extension service (`runtimed.api.<x>.v1.<file>`, `<Service>`)."""
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = Stub(self._connection, module, name, self)
        return self._stubs[key]

    # daemon -------------------------------------------------------------------------

    def version(self) -> dict[str, str]:
        from google.protobuf import empty_pb2

        response = self._stub("version").Version(empty_pb2.Empty())
        return {"version": response.version, "revision": response.revision}

    def server_info(self) -> dict:
        from google.protobuf import empty_pb2

        stub = self._stub("introspection")
        response = stub.Server(empty_pb2.Empty())
        return {"uuid": response.uuid, "pid": getattr(response, "pid", 0)}

    def plugins(self, filters: list[str] | None = None) -> list[dict]:
        stub = self._stub("introspection")
        response = stub.Plugins(stub.pb.PluginsRequest(filters=filters or []))
        return [
            {"type": p.type, "id": p.id, "status": "error" if p.HasField("init_err") else "ok"}
            for p in response.plugins
        ]

    # namespaces ---------------------------------------------------------------------

    def list_namespaces(self) -> list[dict]:
        stub = self._stub("namespaces")
        response = stub.List(stub.pb.ListNamespacesRequest())
        return [{"name": n.name, "labels": dict(n.labels)} for n in response.namespaces]

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        stub = self._stub("namespaces")
        stub.Create(stub.pb.CreateNamespaceRequest(namespace=stub.pb.Namespace(name=name, labels=labels or {})))

    def remove_namespace(self, name: str) -> None:
        stub = self._stub("namespaces")
        stub.Delete(stub.pb.DeleteNamespaceRequest(name=name))

    def label_namespace(self, name: str, labels: dict[str, str]) -> None:
        """Set labels (an empty value removes the label)."""
        stub = self._stub("namespaces")
        request = stub.pb.UpdateNamespaceRequest(namespace=stub.pb.Namespace(name=name, labels=labels))
        request.update_mask.paths.extend(f"labels.{k}" for k in labels)
        stub.Update(request)

    # leases -------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, expire: timedelta = timedelta(hours=24)) -> Iterator[str]:
        """Protect everything created inside from garbage collection until the end."""
        if self.lease_id is not None:
            yield self.lease_id
            return
        stub = self._stub("leases")
        until = (datetime.now(UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease_id = f"ctl-{os.urandom(8).hex()}"
        stub.Create(stub.pb.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": until}))
        self.lease_id = lease_id
        try:
            yield lease_id
        finally:
            self.lease_id = None
            try:
                stub.Delete(stub.pb.DeleteRequest(id=lease_id))
            except NotFound:
                pass

    # events -------------------------------------------------------------------------

    def events(self, filters: list[str] | None = None) -> EventStream:
        """Events as they happen, across namespaces, matching any of `filters`
        (containerd's grammar: `topic~="/tasks/"`, `namespace==default`)."""
        from ctl.client.containers import EventStream

        return EventStream(self, filters)

    # running ------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, container_id: str, image: str, spec_options: SpecOptions | None = None,
            options: CreateOptions | None = None) -> Iterator[RunningContainer]:
        """Create and start a container whose output is collected; removed on exit."""
        from runtimed.oci.spec import SpecOptions

        spec_options = spec_options or SpecOptions()
        record = self.containers.create(container_id, image, spec_options, options)
        running = RunningContainer(self, container_id, container=record)
        try:
            running.start(terminal=spec_options.terminal)
            yield running
        finally:
            running.cleanup()


class RunningContainer:
    """A started container with its output captured (for programs, not terminals)."""

    def __init__(self, client: Client, container_id: str, *, container: Container | None = None):
        """`container`: the record `containers.create` returned, when at hand (its task is
        then created without a Containers.Get and a Snapshots.Mounts)."""
        self.client = client
        self.id = container_id
        self._record = container
        self._out = _Spool()
        self._err = _Spool()
        self._fifos: FifoSet | None = None
        self._attachment: Attachment | None = None
        self._exit = None

    @property
    def container(self) -> Container:
        return self.client.containers.get(self.id)

    def start(self, terminal: bool = False) -> int:
        from ctl.client.cio import Attachment, FifoSet

        self._fifos = FifoSet.create(self.id, stdin=False, terminal=terminal)
        self._attachment = Attachment(self._fifos, stdout=self._out, stderr=self._err)
        self._attachment.start()
        try:
            self.client.tasks.create(self.id, self._fifos.stdio, container=self._record)
        except BaseException:
            self._attachment.cancel()
            raise
        self._exit = self.client.tasks.wait_async(self.id)
        return self.client.tasks.start(self.id)

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """The exit status (TimeoutError when the process runs on past `timeout`). The
        output is then whole: its end is waited for, except when something outside the
        container holds it open past `cio.OUTPUT_GRACE` (see `Attachment.wait`)."""
        status = self._exit.result(timeout=timeout)
        if self._attachment:
            self._attachment.wait()
        return status

    def output(self) -> bytes:
        return _contents(self._out)

    def errors(self) -> bytes:
        return _contents(self._err)

    def cleanup(self) -> None:
        try:
            self.client.containers.remove(self.id, force=True, volumes=True, container=self._record)
        except NotFound:
            pass
        if self._attachment:
            self._attachment.cancel()
            self._attachment.close()
        self._out.close()
        self._err.close()


class _Spool:
    """A temporary file made when the first output arrives (its `fileno`): most programs
    run this way print little or nothing, and each file is an inode made and freed."""

    def __init__(self) -> None:
        self.file = None

    def fileno(self) -> int:
        if self.file is None:
            import tempfile

            self.file = tempfile.TemporaryFile()
        return self.file.fileno()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _contents(spool: _Spool) -> bytes:
    """What a copier wrote so far. pread: the copier writes at the file's offset, which a
    seek here would move (it may still be running when `wait` gave up on it)."""
    if spool.file is None:
        return b""
    fd = spool.file.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0)


__all__ = ["Client", "RunningContainer", "DEFAULT_ADDRESS"]


def __getattr__(name: str):
    """The names this module used to import eagerly, still importable from here."""
    if name in ("SpecOptions", "CreateOptions", "Stdio"):
        from ctl import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
