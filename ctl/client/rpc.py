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

        def metadata_for(lease: str | None) -> list[tuple[str, str]]:
            metadata = [("containerd-namespace", context.namespace)]
            lease = lease or context.lease_id
            if lease:
                metadata.append(("containerd-lease", lease))
            return metadata

        def call(request, *, timeout: float | None = None, lease: str | None = None):
            metadata = metadata_for(lease)
            body = (r.SerializeToString() for r in request) if client_streaming else request.SerializeToString()
            try:
                if server_streaming:
                    return StreamCall(channel.call(path, body, metadata, timeout), response_class, address)
                return response_class.FromString(channel.unary(path, body, metadata, timeout))
            except RpcError as exc:
                raise typed_error(exc, address) from None

        def start(request, *, timeout: float | None = None, lease: str | None = None) -> Pending:
            """Send a unary request now; `result()` reads the response."""
            try:
                return Pending(channel.call(path, request.SerializeToString(), metadata_for(lease), timeout),
                               response_class, address)
            except RpcError as exc:
                raise typed_error(exc, address) from None

        call.__name__ = name
        if not (client_streaming or server_streaming):
            call.start = start
        self.__dict__[name] = call
        return call


class Pending:
    """A unary call whose request has been sent: the daemon works on it while the caller
    does something else, a second call on another connection included, without a thread
    (`Stub.<Method>.start`). `result()` returns the response or raises its typed error;
    `cancel()` gives up on it."""

    def __init__(self, call, response_class, address: str):
        self._call = call
        self._response_class = response_class
        self._address = address
        self._convert = None
        self._read = False

    def then(self, convert) -> Pending:
        """Pass the response through `convert` in `result()`; returns this call."""
        previous = self._convert
        self._convert = convert if previous is None else lambda response: convert(previous(response))
        return self

    def result(self):
        self._read = True
        try:
            messages = list(self._call)
        except RpcError as exc:
            raise typed_error(exc, self._address) from None
        if len(messages) != 1:
            raise typed_error(RpcError("INTERNAL", f"{len(messages)} response messages to a unary call"),
                              self._address)
        response = self._response_class.FromString(messages[0])
        return response if self._convert is None else self._convert(response)

    def cancel(self) -> None:
        """Give up on the response (unless `result()` read it): the stream is reset and
        its connection closed."""
        if not self._read:
            self._read = True
            self._call.abandon()


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
