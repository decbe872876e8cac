"""Service stubs: namespace metadata on every call, errors typed once.

Every call goes through `Stub`, which adds the `containerd-namespace` (and lease) metadata
and turns a non-OK gRPC status into the matching `runtimed.errors` class, so callers of the
library never see transport exceptions. The transport is `ctl.client.wire` (gRPC over
HTTP/2 in the standard library: ctl starts without importing grpcio); messages are the
generated protobuf classes, methods and their streaming kinds come from the service
descriptors in the generated `_pb2` modules.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

from ctl.client import protobuf_imports
from ctl.client.wire import Channel, RpcError
from runtimed.errors import RuntimedError, Unavailable, from_code

protobuf_imports.defer_pure_python()

MAX_MESSAGE_SIZE = 16 << 20


def typed_error(exc: RpcError, address: str) -> RuntimedError:
    details = exc.details or exc.code
    if exc.code == "UNAVAILABLE" and ("connect" in details.lower() or "No such file" in details):
        if not os.path.exists(address):
            return Unavailable(f"cannot connect to runtimed at {address}: is the daemon running?")
        return Unavailable(f"cannot connect to runtimed at {address}: {details}")
    error = from_code(exc.code, details)
    if type(error) is RuntimedError:  # no class of its own (UNKNOWN, DATA_LOSS...): keep its name
        error.code = exc.code
    return error


class Stub:
    """A service stub whose methods take a request and return the response (or iterate
    a response stream; a client-streaming method takes an iterable of requests), with
    namespace metadata added and errors typed."""

    def __init__(self, connection: Connection, module: str, service: str, context):
        self.pb = importlib.import_module(module + "_pb2")
        self._service = self.pb.DESCRIPTOR.services_by_name[service]
        self._connection = connection
        self._context = context  # has .namespace and .lease_id, read at each call

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        method = self._service.methods_by_name.get(name)
        if method is None:
            raise AttributeError(f"{self._service.full_name} has no method {name}")
        from google.protobuf import message_factory

        path = f"/{self._service.full_name}/{name}"
        response_class = message_factory.GetMessageClass(method.output_type)
        channel = self._connection.channel
        address = self._connection.address
        context = self._context
        client_streaming, server_streaming = method.client_streaming, method.server_streaming

        def call(request, *, timeout: float | None = None, lease: str | None = None):
            metadata = [("containerd-namespace", context.namespace)]
            lease = lease or context.lease_id
            if lease:
                metadata.append(("containerd-lease", lease))
            body = (r.SerializeToString() for r in request) if client_streaming else request.SerializeToString()
            try:
                if server_streaming:
                    return StreamCall(channel.call(path, body, metadata, timeout), response_class, address)
                return response_class.FromString(channel.unary(path, body, metadata, timeout))
            except RpcError as exc:
                raise typed_error(exc, address) from None

        call.__name__ = name
        self.__dict__[name] = call
        return call


class StreamCall:
    """A response stream: iterate it; `cancel()` from any thread ends the iteration."""

    def __init__(self, call, response_class, address: str):
        self._call = call
        self._response_class = response_class
        self._address = address

    def __iter__(self) -> Iterator:
        parse = self._response_class.FromString
        try:
            for message in self._call:
                yield parse(message)
        except RpcError as exc:
            if exc.code == "CANCELLED":
                return
            raise typed_error(exc, self._address) from None
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        self._call.cancel()


class Connection:
    """One channel to runtimed, shared by every namespace view of a `Client`."""

    def __init__(self, address: str):
        self.address = address
        self.channel = Channel(address, max_message_size=MAX_MESSAGE_SIZE)

    def close(self) -> None:
        self.channel.close()


SERVICES = {
    "version": ("runtimed.api.containerd.services.version.v1.version", "Version"),
    "namespaces": ("runtimed.api.containerd.services.namespaces.v1.namespace", "Namespaces"),
    "images": ("runtimed.api.containerd.services.images.v1.images", "Images"),
    "content": ("runtimed.api.containerd.services.content.v1.content", "Content"),
    "containers": ("runtimed.api.containerd.services.containers.v1.containers", "Containers"),
    "snapshots": ("runtimed.api.containerd.services.snapshots.v1.snapshots", "Snapshots"),
    "diff": ("runtimed.api.containerd.services.diff.v1.diff", "Diff"),
    "tasks": ("runtimed.api.containerd.services.tasks.v1.tasks", "Tasks"),
    "events": ("runtimed.api.containerd.services.events.v1.events", "Events"),
    "leases": ("runtimed.api.containerd.services.leases.v1.leases", "Leases"),
    "introspection": (
        "runtimed.api.containerd.services.introspection.v1.introspection", "Introspection",
    ),
}
