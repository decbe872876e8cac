"""containerd.services.namespaces.v1.Namespaces over `daemon.namespaces`."""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2 as pb
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2_grpc
from runtimed.filters import labels_lookup, parse
from runtimed.services.base import service


def _to_proto(ns) -> pb.Namespace:
    return pb.Namespace(name=ns.name, labels=ns.labels)


@service
class NamespacesService(namespace_pb2_grpc.NamespacesServicer):
    def __init__(self, store):
        self.store = store

    async def Get(self, request, context):
        return pb.GetNamespaceResponse(namespace=_to_proto(self.store.get(request.name)))

    async def List(self, request, context):
        selected = parse([request.filter] if request.filter else [])
        return pb.ListNamespacesResponse(
            namespaces=[
                _to_proto(ns)
                for ns in self.store.list()
                if selected.match(labels_lookup({"name": ns.name}, ns.labels))
            ]
        )

    async def Create(self, request, context):
        ns = self.store.create(request.namespace.name, dict(request.namespace.labels))
        return pb.CreateNamespaceResponse(namespace=_to_proto(ns))

    async def Update(self, request, context):
        ns = self.store.update(
            request.namespace.name, dict(request.namespace.labels), list(request.update_mask.paths)
        )
        return pb.UpdateNamespaceResponse(namespace=_to_proto(ns))

    async def Delete(self, request, context):
        self.store.delete(request.name)
        return empty_pb2.Empty()


def register(server, daemon) -> None:
    namespace_pb2_grpc.add_NamespacesServicer_to_server(NamespacesService(daemon.namespaces), server)
