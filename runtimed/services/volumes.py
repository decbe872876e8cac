"""runtimed.volumes.v1.Volumes over `daemon.volumes` (an extension of ours)."""

from __future__ import annotations

import asyncio

from runtimed.api.volumes.v1 import volumes_pb2 as pb
from runtimed.api.volumes.v1 import volumes_pb2_grpc
from runtimed.services.base import namespace, service


def to_proto(v) -> pb.Volume:
    message = pb.Volume(
        name=v.name, driver=v.driver, mountpoint=str(v.mountpoint), labels=v.labels,
        anonymous=v.anonymous, used_by=v.used_by, size=v.size,
    )
    message.created_at.FromNanoseconds(v.created_at)
    return message


@service
class VolumesService(volumes_pb2_grpc.VolumesServicer):
    def __init__(self, store):
        self.store = store

    async def Create(self, request, context):
        volume = self.store.create(namespace(context), request.name, request.driver,
                                   dict(request.labels), request.anonymous)
        return pb.CreateVolumeResponse(volume=to_proto(volume))

    async def Get(self, request, context):
        volume = await asyncio.to_thread(self.store.get, namespace(context), request.name)
        return pb.GetVolumeResponse(volume=to_proto(volume))

    async def List(self, request, context):
        found = await asyncio.to_thread(
            self.store.list, namespace(context), list(request.filters), request.with_size
        )
        return pb.ListVolumesResponse(volumes=[to_proto(v) for v in found])

    async def Remove(self, request, context):
        reclaimed = await asyncio.to_thread(
            self.store.remove, namespace(context), request.name, request.force
        )
        return pb.RemoveVolumeResponse(reclaimed=reclaimed)

    async def Prune(self, request, context):
        removed, reclaimed = await asyncio.to_thread(
            self.store.prune, namespace(context), list(request.filters), request.all
        )
        return pb.PruneVolumesResponse(removed=removed, reclaimed=reclaimed)

    async def Populate(self, request, context):
        copied = await asyncio.to_thread(
            self.store.populate, namespace(context), request.name, request.snapshotter,
            request.snapshot_key, request.path,
        )
        return pb.PopulateVolumeResponse(copied=copied)


def register(server, daemon) -> None:
    volumes_pb2_grpc.add_VolumesServicer_to_server(VolumesService(daemon.volumes), server)
