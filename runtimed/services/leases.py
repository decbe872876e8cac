"""containerd.services.leases.v1.Leases over `daemon.leases`."""

from __future__ import annotations

import asyncio

from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed.api.containerd.services.leases.v1 import leases_pb2 as pb
from runtimed.api.containerd.services.leases.v1 import leases_pb2_grpc
from runtimed.metadata.leases import Lease, Resource
from runtimed.services.base import namespace, service


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def to_proto(lease: Lease) -> pb.Lease:
    return pb.Lease(id=lease.id, created_at=_timestamp(lease.created_at), labels=lease.labels)


@service
class LeasesService(leases_pb2_grpc.LeasesServicer):
    def __init__(self, daemon):
        self.store = daemon.leases
        self.gc = daemon.gc
        self.run = daemon.db.run

    async def Create(self, request, context):
        lease = await self.run(
            self.store.create, namespace(context), request.id or None, dict(request.labels)
        )
        return pb.CreateResponse(lease=to_proto(lease))

    async def Delete(self, request, context):
        await self.run(self.store.delete, namespace(context), request.id)
        if request.sync:
            await self.gc.collect_async()
        return empty_pb2.Empty()

    async def List(self, request, context):
        found = await asyncio.to_thread(self.store.list, namespace(context), list(request.filters))
        return pb.ListResponse(leases=[to_proto(lease) for lease in found])

    async def AddResource(self, request, context):
        resource = Resource(request.resource.id, request.resource.type)
        await self.run(self.store.add_resource, namespace(context), request.id, resource)
        return empty_pb2.Empty()

    async def DeleteResource(self, request, context):
        resource = Resource(request.resource.id, request.resource.type)
        await self.run(self.store.delete_resource, namespace(context), request.id, resource)
        return empty_pb2.Empty()

    async def ListResources(self, request, context):
        found = await self.run(self.store.list_resources, namespace(context), request.id)
        return pb.ListResourcesResponse(
            resources=[pb.Resource(id=r.id, type=r.type) for r in found]
        )


def register(server, daemon) -> None:
    leases_pb2_grpc.add_LeasesServicer_to_server(LeasesService(daemon), server)
