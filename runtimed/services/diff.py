"""containerd.services.diff.v1.Diff over `daemon.differ`."""

from __future__ import annotations

import asyncio

from runtimed.api.containerd.services.diff.v1 import diff_pb2 as pb
from runtimed.api.containerd.services.diff.v1 import diff_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.diff.differ import Descriptor
from runtimed.services.base import lease, namespace, service
from runtimed.snapshots.mount import Mount


def _descriptor(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=d.media_type, digest=d.digest, size=d.size,
                                     annotations=d.annotations)


@service
class DiffService(diff_pb2_grpc.DiffServicer):
    def __init__(self, daemon):
        self.differ = daemon.differ

    async def Apply(self, request, context):
        d = request.diff
        desc = Descriptor(d.media_type, d.digest, d.size, dict(d.annotations))
        mounts = [Mount.from_proto(m) for m in request.mounts]
        applied = await asyncio.to_thread(self.differ.apply, namespace(context), desc, mounts)
        return pb.ApplyResponse(applied=_descriptor(applied))

    async def Diff(self, request, context):
        desc = await asyncio.to_thread(
            self.differ.diff, namespace(context),
            [Mount.from_proto(m) for m in request.left],
            [Mount.from_proto(m) for m in request.right],
            request.media_type, request.ref, dict(request.labels), lease(context),
        )
        return pb.DiffResponse(diff=_descriptor(desc))


def register(server, daemon) -> None:
    diff_pb2_grpc.add_DiffServicer_to_server(DiffService(daemon), server)
