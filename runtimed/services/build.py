"""runtimed.build.v1.Builder over `daemon.builder` (runtimed.build): Dockerfile builds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

from runtimed.api.build.v1 import build_pb2 as pb
from runtimed.api.build.v1 import build_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.build.builder import BuildOptions, Progress
from runtimed.build.context import extract
from runtimed.errors import InvalidArgument
from runtimed.services.base import namespace, service

MAX_CONTEXT = 8 << 30


@service
class BuilderService(build_pb2_grpc.BuilderServicer):
    def __init__(self, builder):
        self.builder = builder

    async def Build(self, request_iterator, context):
        ns = namespace(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "options":
            raise InvalidArgument("the first Build request must carry the options")
        o = first.options
        options = BuildOptions(
            dockerfile=o.dockerfile, tags=list(o.tags), build_args=dict(o.build_args),
            target=o.target, no_cache=o.no_cache, labels=dict(o.labels), platform=o.platform,
            network=o.network, snapshotter=o.snapshotter or "overlayfs",
        )
        work = self.builder.work()
        try:
            archive = work / "context.tar"
            size = 0
            with open(archive, "wb") as f:
                async for request in request_iterator:
                    if request.WhichOneof("request") != "context":
                        raise InvalidArgument("only context chunks may follow the options")
                    size += len(request.context)
                    if size > MAX_CONTEXT:
                        raise InvalidArgument("build context larger than 8 GiB")
                    f.write(request.context)
            root = work / "context"
            if size:
                await asyncio.to_thread(extract, archive, root)
            else:
                root.mkdir()
            os.unlink(archive)
            async with contextlib.aclosing(self.builder.build(ns, root, options)) as items:
                async for item in items:
                    if isinstance(item, Progress):
                        yield pb.BuildResponse(progress=pb.BuildProgress(
                            kind=item.kind, text=item.text, step=item.step, total=item.total))
                    else:
                        t = item.target
                        yield pb.BuildResponse(result=pb.BuildResult(
                            names=item.names, image_id=item.image_id,
                            target=descriptor_pb2.Descriptor(media_type=t.media_type,
                                                             digest=t.digest, size=t.size)))
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)


def register(server, daemon) -> None:
    build_pb2_grpc.add_BuilderServicer_to_server(BuilderService(daemon.builder), server)
