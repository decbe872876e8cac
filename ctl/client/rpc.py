"""The gRPC channel and stubs: namespace metadata on every call, errors typed once.

Every call goes through `Stub`, which adds the `containerd-namespace` (and lease) metadata
and turns `grpc.RpcError` into the matching `runtimed.errors` class, so callers of the
library never see gRPC exceptions.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import grpc

from runtimed.errors import RuntimedError, Unavailable, from_code

MAX_MESSAGE_SIZE = 16 << 20


def typed_error(exc: grpc.RpcError, address: str) -> RuntimedError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(code)
    if code == grpc.StatusCode.UNAVAILABLE and (
        "connect" in details.lower() or "No such file" in details or "socket" in details.lower()
    ):
        if not os.path.exists(address):
            return Unavailable(f"cannot connect to runtimed at {address}: is the daemon running?")
        return Unavailable(f"cannot connect to runtimed at {address}: {details}")
    return from_code(code.name, details)


class Stub:
    """A service stub whose methods take a request and return the response (or iterate
    a response stream), with namespace metadata added and errors typed."""

    def __init__(self, connection: Connection, module: str, service: str, context):
        grpc_module = importlib.import_module(module + "_pb2_grpc")
        self._stub = getattr(grpc_module, service + "Stub")(connection.channel)
        self._connection = connection
        self._context = context  # has .namespace and .lease_id, read at each call
        self.pb = importlib.import_module(module + "_pb2")

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        connection = self._connection
        context = self._context

        streams = isinstance(method, grpc.UnaryStreamMultiCallable | grpc.StreamStreamMultiCallable)

        def call(request, *, timeout: float | None = None, lease: str | None = None):
            metadata = [("containerd-namespace", context.namespace)]
            lease = lease or context.lease_id
            if lease:
                metadata.append(("containerd-lease", lease))
            try:
                if streams:
                    return StreamCall(method(request, timeout=timeout, metadata=metadata), connection.address)
                return method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                raise typed_error(exc, connection.address) from None

        call.__name__ = name
        return call


class StreamCall:
    """A response stream: iterate it; `cancel()` from any thread ends the iteration."""

    def __init__(self, call, address: str):
        self._call = call
        self._address = address

    def __iter__(self) -> Iterator:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
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
        self.channel = grpc.insecure_channel(
            f"unix://{address}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
            ],
        )

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
