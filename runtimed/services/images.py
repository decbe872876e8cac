"""containerd.services.images.v1.Images over `daemon.images`."""

from __future__ import annotations

import asyncio

from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed.api.containerd.services.images.v1 import images_pb2 as pb
from runtimed.api.containerd.services.images.v1 import images_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.errors import InvalidArgument
from runtimed.metadata.images import Descriptor, Image
from runtimed.services.base import namespace, service


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def from_proto(image: pb.Image) -> Image:
    t = image.target
    return Image(
        image.name,
        Descriptor(t.media_type, t.digest, t.size, dict(t.annotations)),
        dict(image.labels),
    )


def to_proto(image: Image) -> pb.Image:
    t = image.target
    return pb.Image(
        name=image.name,
        labels=image.labels,
        target=descriptor_pb2.Descriptor(
            media_type=t.media_type, digest=t.digest, size=t.size, annotations=t.annotations
        ),
        created_at=_timestamp(image.created_at),
        updated_at=_timestamp(image.updated_at),
    )


@service
class ImagesService(images_pb2_grpc.ImagesServicer):
    def __init__(self, daemon):
        self.store = daemon.images
        self.gc = daemon.gc
        self.run = daemon.db.run

    async def Get(self, request, context):
        image = await self.run(self.store.get, namespace(context), request.name)
        return pb.GetImageResponse(image=to_proto(image))

    async def List(self, request, context):
        found = await asyncio.to_thread(self.store.list, namespace(context), list(request.filters))
        return pb.ListImagesResponse(images=[to_proto(i) for i in found])

    async def Create(self, request, context):
        if not request.image.name:
            raise InvalidArgument("Image.Name required")
        created = await self.run(self.store.create, namespace(context), from_proto(request.image))
        return pb.CreateImageResponse(image=to_proto(created))

    async def Update(self, request, context):
        if not request.image.name:
            raise InvalidArgument("Image.Name required")
        updated = await self.run(
            self.store.update, namespace(context), from_proto(request.image),
            list(request.update_mask.paths),
        )
        return pb.UpdateImageResponse(image=to_proto(updated))

    async def Delete(self, request, context):
        await self.run(self.store.delete, namespace(context), request.name)
        if request.sync:
            await self.gc.collect_async()
        return empty_pb2.Empty()


def register(server, daemon) -> None:
    images_pb2_grpc.add_ImagesServicer_to_server(ImagesService(daemon), server)
