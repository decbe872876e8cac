"""runtimed.images.v1.Archives: image archives streamed in and out (runtimed.images.archive).

The core reads and writes plain file objects on a worker thread; this adapter bridges the
gRPC streams to them with a bounded pipe (so a fast client cannot buffer a whole archive
in memory) and relays progress back as it happens. An export stream is closed however the
call ends, which drops the lease on the blobs it sends.
"""

from __future__ import annotations

import asyncio
import queue
import threading

import grpc

from runtimed.api.containerd.types import descriptor_pb2
from runtimed.api.images.v1 import archive_pb2, archive_pb2_grpc
from runtimed.errors import Canceled, InvalidArgument
from runtimed.images.archive import Archives, ExportOptions, ImportOptions, Progress
from runtimed.services.base import lease, namespace, service
from runtimed.services.wire import serve_stream_with_parser, split_bytes_field

_EOF = object()
SERVICE = "runtimed.images.v1.Archives"


class _Pipe:
    """Bytes pushed by the event loop, read by the import thread as a file object."""

    def __init__(self, depth: int = 16):
        self._queue: queue.Queue = queue.Queue(depth)
        self._buffer = memoryview(b"")
        self._closed = threading.Event()  # the reader is done or the call was cancelled
        self._eof = False

    def push(self, item) -> None:
        """Blocking (run it in a thread); drops data once the reader has gone."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self._closed.set()

    def read(self, size: int = -1) -> memoryview:
        """The next bytes pushed, at most `size`: a view into what was pushed, no copy."""
        while not self._buffer and not self._eof:
            if self._closed.is_set():
                raise Canceled("import cancelled: the client went away")
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _EOF:
                self._eof = True
            else:
                self._buffer = memoryview(item)
        if size is None or size < 0 or size >= len(self._buffer):
            data, self._buffer = self._buffer, memoryview(b"")
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _descriptor(desc) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=desc.media_type, digest=desc.digest, size=desc.size,
        annotations=desc.annotations,
    )


def _import_options(msg: archive_pb2.ImportOptions) -> ImportOptions:
    return ImportOptions(
        base_name=msg.base_name, digests=msg.digests,
        skip_digest_for_named=msg.skip_digest_for_named, index_name=msg.index_name,
        all_platforms=msg.all_platforms, platform=msg.platform, unpack=msg.unpack,
        snapshotter=msg.snapshotter, labels=dict(msg.labels),
    )


_DATA_FIELD = 2  # ImportRequest.data
_NO_OPTIONS = archive_pb2.ImportRequest()


def parse_import_request(raw: bytes) -> tuple[archive_pb2.ImportRequest, memoryview | bytes]:
    """An ImportRequest and its `data`: a body of nothing but data (every request after
    the first) gives a view into the body, not the two copies the generated parser and a
    field read make; anything else goes through the generated parser."""
    split = split_bytes_field(raw, _DATA_FIELD)
    if split is not None and not split[0]:
        return _NO_OPTIONS, split[1]
    message = archive_pb2.ImportRequest.FromString(raw)
    return message, message.data


@service
class ArchivesService(archive_pb2_grpc.ArchivesServicer):
    def __init__(self, archives: Archives):
        self.archives = archives

    async def Import(self, request_iterator, context):
        ns, lease_id = namespace(context), lease(context)
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("import stream ended before any request")
        first, data = first
        pipe = _Pipe()
        options = ImportOptions()
        if first.WhichOneof("request") == "options":
            options = _import_options(first.options)
        elif data:
            await asyncio.to_thread(pipe.push, data)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress] = asyncio.Queue()

        def progress(p: Progress) -> None:
            loop.call_soon_threadsafe(events.put_nowait, p)

        async def feed() -> None:
            try:
                async for request, data in request_iterator:
                    if request.WhichOneof("request") == "options":
                        raise InvalidArgument("import options must come in the first request only")
                    if data:
                        await asyncio.to_thread(pipe.push, data)
            finally:
                await asyncio.to_thread(pipe.push, _EOF)

        feeder = asyncio.create_task(feed())
        work = asyncio.create_task(asyncio.to_thread(
            self.archives.import_archive, ns, pipe, options, progress, lease_id))
        try:
            while not work.done():
                getter = asyncio.create_task(events.get())
                done, _ = await asyncio.wait({getter, work, feeder}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield _progress(getter.result())
                else:
                    getter.cancel()
                if feeder in done and feeder.exception() is not None:
                    pipe.close()  # stop the import: the request stream is broken
                    await asyncio.wait({work})
                    raise feeder.exception()
            while not events.empty():
                yield _progress(events.get_nowait())
            imported = work.result()
        finally:
            pipe.close()
            feeder.cancel()
            if not work.done():
                await asyncio.wait({work})
        yield archive_pb2.ImportResponse(result=archive_pb2.ImportResult(images=[
            archive_pb2.ImportedImage(name=i.name, target=_descriptor(i.target)) for i in imported
        ]))

    async def Export(self, request, context):
        ns = namespace(context)
        options = ExportOptions(
            all_platforms=request.all_platforms, platforms=list(request.platforms),
            skip_manifest_json=request.skip_manifest_json,
            skip_non_distributable=request.skip_non_distributable,
            docker=request.format == archive_pb2.ExportRequest.DOCKER,
        )
        opening = asyncio.ensure_future(
            asyncio.to_thread(self.archives.export_chunks, ns, list(request.names), options))
        try:
            chunks = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the client went away while the export was planned
            opening.add_done_callback(_close_when_opened)
            raise
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    return
                yield archive_pb2.ExportResponse(data=chunk)
        finally:
            # done, failed, or the client went away (cancelled here, or closed at the
            # yield): the export's lease goes. Shielded: a second cancellation must not
            # leave the lease behind; close waits for a chunk still being read.
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(None, chunks.close))


def _close_when_opened(opening: asyncio.Future) -> None:
    if not opening.cancelled() and opening.exception() is None:
        asyncio.get_running_loop().run_in_executor(None, opening.result().close)


def _progress(p: Progress) -> archive_pb2.ImportResponse:
    return archive_pb2.ImportResponse(progress=archive_pb2.ImportProgress(
        action=p.action, ref=p.ref, offset=p.offset, total=p.total))


def register(server: grpc.aio.Server, daemon) -> None:
    archives = Archives(daemon.content, daemon.images, daemon.leases, daemon.gc,
                        lambda: daemon.unpacker)
    daemon.archives = archives
    daemon.on_start.append(lambda: asyncio.to_thread(archives.recover, daemon.namespaces.list))
    servicer = ArchivesService(archives)
    archive_pb2_grpc.add_ArchivesServicer_to_server(servicer, server)
    serve_stream_with_parser(server, SERVICE, "Import", servicer.Import, parse_import_request,
                             archive_pb2.ImportResponse)
