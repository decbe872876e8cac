"""containerd.services.content.v1.Content over `daemon.content`.

Write follows containerd's server loop message by message, because clients (ctr, the Go
client's remote writer) depend on its exact replies: one response per request; STAT
reports the resume offset; an `expected` digest already present ends the stream with
ALREADY_EXISTS (and drops the ingest); a WRITE or COMMIT at offset 0 on a non-empty ingest
restarts it, at any other offset it must equal the current one.
"""

from __future__ import annotations

import asyncio
import time

from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb
from runtimed.api.containerd.services.content.v1 import content_pb2_grpc
from runtimed.content import digests
from runtimed.content.store import CHUNK, ContentInfo, OutOfRange, Status
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound
from runtimed.services.base import lease, namespace, service
from runtimed.services.wire import serve_stream_with_parser, split_bytes_field

LIST_BATCH = 100
# A Write message's bytes are written and hashed on the event loop while that takes less
# than this; a slower write (the disk throttles) sends the stream's next one to a thread,
# and so does one that may block (Writer.write_is_plain: hooks, a writeback to wait for).
INLINE_WRITE_LIMIT = 0.004
SERVICE = "containerd.services.content.v1.Content"
_DATA_FIELD = 6  # WriteContentRequest.data


def parse_write_request(raw: bytes) -> tuple[pb.WriteContentRequest, memoryview | bytes]:
    """A WriteContentRequest and its `data`, the data as a view into the received body.

    The generated parser copies `data` into its arena and every read of the field copies
    it again into a new bytes object: three passes over each MiB a client streams in, and
    fresh pages to fault in for each. Here the `data` field is cut out of the body and the
    rest (a few dozen bytes) goes through the generated parser, so every other field
    (labels, unknown fields, UTF-8 checks, errors on a broken body) parses exactly as
    before. Any body that is not one plain `data` field falls back to the generated parser.
    """
    split = split_bytes_field(raw, _DATA_FIELD)
    if split is None:
        message = pb.WriteContentRequest.FromString(raw)
        return message, message.data
    rest, data = split
    return pb.WriteContentRequest.FromString(rest), data


def _open_and_read(store, ns: str, digest: str, offset: int, size: int) -> tuple[object, bytes]:
    """The blob open at `offset` and its first `size` bytes, in one hop to a worker thread:
    most reads (manifests, indexes, configs) fit in one message, and each hop costs ~0.1 ms
    of CPU and several context switches on a busy machine."""
    f = store.open_blob(ns, digest)
    try:
        f.seek(offset)
        return f, f.read(size)
    except BaseException:
        f.close()
        raise


def _timed_write(writer, data) -> float:
    """Write `data`; the seconds it took.

    Why on the loop at all: the hop to a worker thread and back cost more than the work
    on a busy machine (each wake-up waits for a core the client or the layer stager
    holds; docs/content.md). The loop spends about as long parsing the message's frames;
    a slow disk moves the stream's writes back to a thread."""
    started = time.perf_counter()
    writer.write(data)
    return time.perf_counter() - started


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_to_proto(info: ContentInfo) -> pb.Info:
    return pb.Info(
        digest=info.digest, size=info.size, created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at), labels=info.labels,
    )


def status_to_proto(st: Status) -> pb.Status:
    return pb.Status(
        started_at=_timestamp(st.started_at), updated_at=_timestamp(st.updated_at), ref=st.ref,
        offset=st.offset, total=st.total, expected=st.expected,
    )


@service
class ContentService(content_pb2_grpc.ContentServicer):
    def __init__(self, daemon):
        self.store = daemon.content
        self.run = daemon.db.run

    async def Info(self, request, context):
        info = await self.run(self.store.info, namespace(context), request.digest)
        return pb.InfoResponse(info=info_to_proto(info))

    async def Update(self, request, context):
        info = ContentInfo(request.info.digest, 0, 0, 0, dict(request.info.labels))
        updated = await self.run(
            self.store.update, namespace(context), info, list(request.update_mask.paths)
        )
        return pb.UpdateResponse(info=info_to_proto(updated))

    async def List(self, request, context):
        infos = await asyncio.to_thread(self.store.list, namespace(context), list(request.filters))
        for start in range(0, len(infos), LIST_BATCH):
            yield pb.ListContentResponse(
                info=[info_to_proto(i) for i in infos[start:start + LIST_BATCH]]
            )

    async def Delete(self, request, context):
        await asyncio.to_thread(
            self.store.delete, namespace(context), request.digest, lease(context)
        )
        return empty_pb2.Empty()

    async def Read(self, request, context):
        ns = namespace(context)
        digests.validate(request.digest)
        info = await self.run(self.store.info, ns, request.digest)
        offset = max(request.offset, 0)
        if offset > info.size:
            raise OutOfRange(f"read past object length {info.size} bytes")
        size = request.size
        if size <= 0 or offset + size > info.size:
            size = info.size - offset
        f, data = await asyncio.to_thread(_open_and_read, self.store, ns, request.digest, offset,
                                          min(CHUNK, size))
        try:
            while data:
                yield pb.ReadContentResponse(offset=offset, data=data)
                offset += len(data)
                size -= len(data)
                data = await asyncio.to_thread(f.read, min(CHUNK, size)) if size > 0 else b""
        finally:
            f.close()

    async def Status(self, request, context):
        st = await asyncio.to_thread(self.store.status, namespace(context), request.ref)
        return pb.StatusResponse(status=status_to_proto(st))

    async def ListStatuses(self, request, context):
        statuses = await asyncio.to_thread(
            self.store.list_statuses, namespace(context), list(request.filters)
        )
        return pb.ListStatusesResponse(statuses=[status_to_proto(s) for s in statuses])

    async def Abort(self, request, context):
        await asyncio.to_thread(self.store.abort, namespace(context), request.ref, lease(context))
        return empty_pb2.Empty()

    async def Write(self, request_iterator, context):
        ns, lease_id = namespace(context), lease(context)
        requests = request_iterator.__aiter__()
        try:
            req, data = await requests.__anext__()
        except StopAsyncIteration:
            return
        ref = req.ref
        if not ref:
            raise InvalidArgument("first message must have a reference")
        total, expected = req.total, req.expected
        # refuses an `expected` the namespace has already, as the check below does
        try:
            writer = await asyncio.to_thread(
                self.store.writer, ns, ref, total=total, expected=expected, lease=lease_id,
                announce=True,
            )
        except AlreadyExists:  # and drops the ref's ingest, one an earlier stream left
            await asyncio.to_thread(self._drop, ns, ref, lease_id)
            raise
        inline = False  # the stream's last write was quick: write the next on the loop
        unwritten = None  # a WRITE's bytes, answered, to hash and write after the answer
        first = True
        try:
            while True:
                st = writer.status()
                reply = pb.WriteContentResponse(action=req.action, offset=st.offset)
                check = "" if first else req.expected  # at COMMIT, in the commit's own hop
                first = False
                if req.expected:
                    expected = req.expected
                    if check and req.action != pb.COMMIT:
                        await asyncio.to_thread(self._refuse_present, writer, ns, ref,
                                                lease_id, check)
                if req.total > 0:
                    total = req.total
                if req.action == pb.STAT:
                    reply.digest = writer.digest()
                    reply.started_at.CopyFrom(_timestamp(st.started_at))
                    reply.updated_at.CopyFrom(_timestamp(st.updated_at))
                    reply.total = total
                else:
                    if req.offset > 0 and req.offset != st.offset:
                        raise OutOfRange(
                            f"write @{req.offset} must occur at current offset {st.offset}"
                        )
                    if req.offset == 0 and st.offset > 0:
                        await asyncio.to_thread(writer.truncate, 0)
                        reply.offset = 0
                    if data and inline and writer.write_is_plain(len(data)):
                        if req.action == pb.WRITE:  # answered first, hashed and written after
                            reply.offset = writer.offset + len(data)
                            unwritten = data
                        else:
                            inline = _timed_write(writer, data) < INLINE_WRITE_LIMIT
                            reply.offset = writer.offset
                    elif data:
                        took = await asyncio.to_thread(_timed_write, writer, data)
                        inline = took < INLINE_WRITE_LIMIT
                        reply.offset = writer.offset
                    if req.action == pb.COMMIT:
                        await asyncio.to_thread(self._commit, writer, ns, ref, lease_id, check,
                                                total, expected, dict(req.labels))
                    if unwritten is None:  # optional but for COMMIT (content.proto): an
                        reply.digest = writer.digest()  # answer ahead of its bytes has none
                yield reply
                if unwritten is not None:
                    await asyncio.sleep(0)  # the loop sends the answer, then the bytes go
                    inline = _timed_write(writer, unwritten) < INLINE_WRITE_LIMIT
                    unwritten = None
                if req.action == pb.COMMIT:
                    return
                try:
                    req, data = await requests.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            writer.close()

    def _refuse_present(self, writer, ns: str, ref: str, lease_id: str | None,
                        digest: str) -> None:
        """containerd's rule: a Write naming an `expected` digest the namespace has already
        ends with ALREADY_EXISTS, and its ingest is dropped."""
        if self.store.exists(ns, digest):
            writer.close()
            self._drop(ns, ref, lease_id)
            raise AlreadyExists(f"blob with expected digest {digest} exists")

    def _drop(self, ns: str, ref: str, lease_id: str | None) -> None:
        try:
            self.store.abort(ns, ref, lease_id)
        except NotFound:
            pass

    def _commit(self, writer, ns, ref, lease_id, check, total, expected, labels) -> None:
        """The commit, after `_refuse_present` when the message named a digest to check:
        one hop to a worker thread for both (a small blob's Write made five)."""
        if check:
            self._refuse_present(writer, ns, ref, lease_id, check)
        writer.commit(total, expected, labels)


def register(server, daemon) -> None:
    servicer = ContentService(daemon)
    content_pb2_grpc.add_ContentServicer_to_server(servicer, server)
    serve_stream_with_parser(server, SERVICE, "Write", servicer.Write, parse_write_request,
                             pb.WriteContentResponse)
