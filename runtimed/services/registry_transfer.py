"""runtimed.registry.v1.Registry: server-side pull and push (runtimed.images.registry).

The transfer runs on a worker thread; progress crosses to the event loop through a queue
and streams out as it happens. A client that goes away cancels the transfer.
"""

from __future__ import annotations

import asyncio

import grpc

from runtimed.api.containerd.types import descriptor_pb2
from runtimed.api.registry.v1 import registry_pb2, registry_pb2_grpc
from runtimed.errors import InvalidArgument
from runtimed.images import platforms
from runtimed.images.registry.credentials import Credentials
from runtimed.images.registry.pull import PullOptions
from runtimed.images.registry.push import PushOptions
from runtimed.images.registry.remote import Progress, TransferOptions
from runtimed.images.registry.transfer import PullRequest, RegistryTransfers
from runtimed.services.base import lease, namespace, service


def _descriptor(desc) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=desc.media_type,
        digest=desc.digest,
        size=desc.size,
        annotations=desc.annotations,
    )


def _matcher(messages) -> platforms.Matcher | None:
    if not messages:
        return None
    chosen = [
        platforms.normalize(platforms.Platform(p.os or "linux", p.architecture, p.variant))
        for p in messages
    ]
    if len(chosen) == 1:
        return platforms.only(chosen[0])
    return platforms.Ordered(tuple(chosen))


def _options(cls: type[TransferOptions], msg: registry_pb2.TransferOptions, **extra):
    if msg.concurrency < 0 or msg.progress_timeout < 0 or msg.timeout < 0:
        raise InvalidArgument("concurrency and timeouts must not be negative")
    kwargs = dict(extra)
    if msg.concurrency:
        kwargs["concurrency"] = min(msg.concurrency, 32)
    if msg.progress_timeout:
        kwargs["progress_timeout"] = msg.progress_timeout
    if msg.timeout:
        kwargs["timeout"] = msg.timeout
    auth = msg.auth
    if auth.username or auth.password or auth.identity_token:
        kwargs["credentials"] = Credentials(auth.username, auth.password, auth.identity_token)
    return cls(plain_http=msg.plain_http, insecure=msg.insecure, **kwargs)


def _progress(p: Progress) -> registry_pb2.BlobProgress:
    return registry_pb2.BlobProgress(
        digest=p.digest, media_type=p.media_type, state=p.state, offset=p.offset, total=p.total
    )


async def _relay(work, options: TransferOptions, wrap):
    """Run `work(progress)` on a thread; yield wrapped progress until it finishes."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def progress(p: Progress) -> None:
        loop.call_soon_threadsafe(events.put_nowait, p)

    task = asyncio.create_task(asyncio.to_thread(work, progress))
    try:
        while not task.done():
            getter = asyncio.create_task(events.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield wrap(_progress(getter.result()))
            else:
                getter.cancel()
        while not events.empty():
            yield wrap(_progress(events.get_nowait()))
        yield task.result()
    finally:
        if not task.done():
            options.cancelled.set()  # the client went away
            await asyncio.wait({task})


@service
class RegistryService(registry_pb2_grpc.RegistryServicer):
    def __init__(self, transfers: RegistryTransfers):
        self.transfers = transfers

    async def Pull(self, request, context):
        ns = namespace(context)
        if not request.reference:
            raise InvalidArgument("reference is required")
        options = _options(
            PullOptions,
            request.options,
            platforms=_matcher(request.platforms),
            all_platforms=request.all_platforms,
            lease=lease(context),
        )
        first = request.platforms[0] if request.platforms else None
        platform = (
            "/".join(p for p in (first.os or "linux", first.architecture, first.variant) if p)
            if first
            else ""
        )
        pull = PullRequest(
            request.reference,
            options,
            dict(request.labels),
            request.unpack,
            request.snapshotter,
            platform,
        )
        async for item in _relay(
            lambda progress: self.transfers.pull(ns, pull, progress),
            options,
            lambda p: registry_pb2.PullResponse(progress=p),
        ):
            if isinstance(item, registry_pb2.PullResponse):
                yield item
            else:
                yield registry_pb2.PullResponse(
                    result=registry_pb2.PullResult(
                        name=item.name,
                        target=_descriptor(item.target),
                        manifests=[_descriptor(m) for m in item.manifests],
                    )
                )

    async def Push(self, request, context):
        ns = namespace(context)
        if not request.image:
            raise InvalidArgument("image is required")
        options = _options(PushOptions, request.options, platforms=_matcher(request.platforms))
        async for item in _relay(
            lambda progress: self.transfers.push(
                ns, request.image, request.reference, options, progress
            ),
            options,
            lambda p: registry_pb2.PushResponse(progress=p),
        ):
            if isinstance(item, registry_pb2.PushResponse):
                yield item
            else:
                ref, target = item
                yield registry_pb2.PushResponse(
                    result=registry_pb2.PushResult(reference=ref, target=_descriptor(target))
                )


def register(server: grpc.aio.Server, daemon) -> None:
    registry_pb2_grpc.add_RegistryServicer_to_server(RegistryService(daemon.registry), server)
