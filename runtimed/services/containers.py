"""containerd.services.containers.v1.Containers over `daemon.containers`.

List is the one call whose cost grows with the number of containers, and orchestrators
call it often. Building 10,000 protobuf messages per call costs a third of a second in
Python, so the service keeps each container's wire encoding, keyed by its update time,
and an unfiltered List concatenates those encodings (a repeated message field is just
`tag, length, bytes` per element) instead of building messages at all. Get, which a
client calls several times per container lifecycle, answers from the same encodings
(reading only the update time instead of decoding and re-encoding the record).
"""

from __future__ import annotations

from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed.api.containerd.services.containers.v1 import containers_pb2 as pb
from runtimed.api.containerd.services.containers.v1 import containers_pb2_grpc
from runtimed.metadata.containers import AnyValue, Container
from runtimed.services.base import namespace, service

_CONTAINERS_FIELD = b"\x0a"  # ListContainersResponse.containers: field 1, length-delimited
_CONTAINER_FIELD = b"\x0a"  # GetContainerResponse.container: field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class WireCache:
    """Serialized Container messages by (namespace, id), valid while updated_at matches."""

    def __init__(self, store):
        self.store = store
        self._entries: dict[tuple[str, str], tuple[int, bytes]] = {}

    def list_response(self, ns: str) -> bytes:
        stamps = self.store.stamps(ns)
        entries = self._entries
        if any(entries.get((ns, cid), (None,))[0] != stamp for cid, stamp in stamps):
            for c in self.store.list(ns):
                entries[(ns, c.id)] = (c.updated_at, to_proto(c).SerializeToString())
        parts = []
        for cid, _ in stamps:
            encoded = entries[(ns, cid)][1]
            parts += (_CONTAINERS_FIELD, _varint(len(encoded)), encoded)
        return b"".join(parts)

    def get_response(self, ns: str, cid: str) -> bytes:
        """A serialized GetContainerResponse."""
        stamp = self.store.stamp(ns, cid)
        entry = self._entries.get((ns, cid))
        if entry is None or entry[0] != stamp:
            c = self.store.get(ns, cid)
            entry = self._entries[(ns, cid)] = (c.updated_at, to_proto(c).SerializeToString())
        encoded = entry[1]
        return b"".join((_CONTAINER_FIELD, _varint(len(encoded)), encoded))

    def forget(self, ns: str, cid: str) -> None:
        self._entries.pop((ns, cid), None)


def _serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _any(message) -> AnyValue | None:
    return AnyValue(message.type_url, message.value) if message.type_url else None


def from_proto(c: pb.Container) -> Container:
    return Container(
        id=c.id,
        runtime_name=c.runtime.name,
        spec=_any(c.spec) or AnyValue(),
        labels=dict(c.labels),
        image=c.image,
        runtime_options=_any(c.runtime.options),
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        extensions={k: AnyValue(v.type_url, v.value) for k, v in c.extensions.items()},
    )


def to_proto(c: Container) -> pb.Container:
    message = pb.Container(
        id=c.id, labels=c.labels, image=c.image, snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key, created_at=_timestamp(c.created_at),
        updated_at=_timestamp(c.updated_at),
    )
    message.runtime.name = c.runtime_name
    if c.runtime_options:
        message.runtime.options.type_url = c.runtime_options.type_url
        message.runtime.options.value = c.runtime_options.value
    message.spec.type_url = c.spec.type_url
    message.spec.value = c.spec.value
    for key, value in c.extensions.items():
        message.extensions[key].type_url = value.type_url
        message.extensions[key].value = value.value
    return message


@service
class ContainersService(containers_pb2_grpc.ContainersServicer):
    def __init__(self, daemon):
        self.daemon = daemon
        self.store = daemon.containers
        self.wire = WireCache(self.store)

    async def Get(self, request, context):
        return self.wire.get_response(namespace(context), request.id)

    async def List(self, request, context):
        if not request.filters:
            return self.wire.list_response(namespace(context))
        found = self.store.list(namespace(context), list(request.filters))
        return pb.ListContainersResponse(containers=[to_proto(c) for c in found])

    async def ListStream(self, request, context):
        for c in self.store.list(namespace(context), list(request.filters)):
            yield pb.ListContainerMessage(container=to_proto(c))

    async def Create(self, request, context):
        created = self.store.create(namespace(context), from_proto(request.container))
        return pb.CreateContainerResponse(container=to_proto(created))

    async def Update(self, request, context):
        updated = self.store.update(
            namespace(context), from_proto(request.container), list(request.update_mask.paths)
        )
        return pb.UpdateContainerResponse(container=to_proto(updated))

    async def Delete(self, request, context):
        ns = namespace(context)
        tasks = getattr(self.daemon, "tasks", None)
        if tasks is not None and hasattr(tasks, "refuse_container_delete"):
            tasks.refuse_container_delete(ns, request.id)
        self.store.delete(ns, request.id)
        self.wire.forget(ns, request.id)
        return empty_pb2.Empty()


class _FastListServer:
    """Registers the generated handlers, with the serializers of List and Get taking ready
    bytes too (the generated code hands over the handler table in its second call)."""

    def __init__(self, server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers):
        pass

    def add_registered_method_handlers(self, name, handlers):
        import grpc

        handlers = dict(handlers)
        for method in ("List", "Get"):
            handlers[method] = handlers[method]._replace(response_serializer=_serialize)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        self.server.add_registered_method_handlers(name, handlers)


def register(server, daemon) -> None:
    containers_pb2_grpc.add_ContainersServicer_to_server(ContainersService(daemon), _FastListServer(server))
