"""runtimed.services.h2server: the HTTP/2 gRPC server of the daemon and the shims, against
grpcio, grpclib (a test-only dependency: an independent peer), ctl's own client and a raw
HTTP/2 peer (for the protocol's edge cases).

The server runs on a uvloop loop in a thread of the test process, with a MethodTable of
test handlers; each handler reports what happened to it through threading.Events.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

import grpc
import pytest
import uvloop

from ctl.client import wire
from runtimed import http2
from runtimed.api.containerd.services.version.v1 import version_pb2
from runtimed.services import base, version
from runtimed.services.h2server import STREAM_WINDOW, Server, parse_timeout, percent_encode

SERVICE = "test.v1.Test"
LIMIT = 1 << 20  # the test server's max message size


class Handlers:
    """Test behaviours; `started`/`cancelled` let a test see into the server."""

    def __init__(self):
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.release: asyncio.Event | None = None
        self.read_gate: asyncio.Event | None = None

    async def echo(self, request, context):
        return request

    async def metadata(self, request, context):
        return repr(sorted(context.invocation_metadata())).encode()

    async def abort(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, request.decode())

    async def big(self, request, context):
        return b"x" * (LIMIT + 1)

    async def hold(self, request, context):
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"released"

    async def total(self, requests, context):
        self.started.set()
        await self.read_gate.wait()
        size = count = 0
        async for message in requests:
            size += len(message)
            count += 1
        return f"{count} {size}".encode()

    async def chunks(self, request, context):
        count, size = map(int, request.decode().split())
        for _ in range(count):
            yield b"c" * size

    async def writes(self, request, context):
        for word in request.decode().split():
            await context.write(word.encode())

    async def bidi(self, requests, context):
        async for message in requests:
            yield message.upper()

    async def in_task(self, request, context):
        """What a handler may rely on: a task (and asyncio.timeout) from its first wait on;
        on Python >= 3.12 from its start too (eager tasks)."""
        eager = asyncio.current_task() is not None
        await asyncio.sleep(0)
        async with asyncio.timeout(5):
            await asyncio.sleep(0)
        return f"{eager} {asyncio.current_task() is not None}".encode()


@pytest.fixture
def served(tmp_path):
    """(socket path, handlers, server, loop) of a Server running in a thread."""
    handlers = Handlers()
    table = base.MethodTable()
    version.register(table, None)
    # a generated servicer's default methods: synchronous, set UNIMPLEMENTED and raise
    from runtimed.api.containerd.services.events.v1 import events_pb2_grpc

    events_pb2_grpc.add_EventsServicer_to_server(events_pb2_grpc.EventsServicer(), table)
    table.add_registered_method_handlers(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(handlers.echo),
        "Metadata": grpc.unary_unary_rpc_method_handler(handlers.metadata),
        "Abort": grpc.unary_unary_rpc_method_handler(handlers.abort),
        "Big": grpc.unary_unary_rpc_method_handler(handlers.big),
        "Hold": grpc.unary_unary_rpc_method_handler(handlers.hold),
        "Total": grpc.stream_unary_rpc_method_handler(handlers.total),
        "Chunks": grpc.unary_stream_rpc_method_handler(handlers.chunks),
        "Writes": grpc.unary_stream_rpc_method_handler(handlers.writes),
        "Bidi": grpc.stream_stream_rpc_method_handler(handlers.bidi),
        "InTask": grpc.unary_unary_rpc_method_handler(handlers.in_task),
    })
    path = str(tmp_path / "s.sock")
    loop = uvloop.new_event_loop()
    server = Server(table, LIMIT)
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        handlers.release = asyncio.Event()
        handlers.read_gate = asyncio.Event()
        loop.run_until_complete(server.start(path))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield path, handlers, server, loop
    if not server.stopping:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _set(loop, event):
    loop.call_soon_threadsafe(event.set)


@pytest.fixture
def channel(served):
    ch = grpc.insecure_channel(f"unix://{served[0]}")
    yield ch
    ch.close()


def _unary(channel, name):
    return channel.unary_unary(f"/{SERVICE}/{name}")


# grpcio, grpclib and ctl's client ---------------------------------------------------------

def test_unary_with_grpcio_big_and_small(channel):
    echo = _unary(channel, "Echo")
    assert echo(b"hello") == b"hello"
    assert echo(b"") == b""
    payload = bytes(range(256)) * 3000  # 768 KiB: many frames each way
    assert echo(payload) == payload


def test_generated_service_with_grpcio_wire_and_grpclib(served, channel):
    from google.protobuf import empty_pb2

    from runtimed.api.containerd.services.version.v1 import version_pb2_grpc

    assert version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty()).revision == "runtimed"
    raw = wire.Channel(served[0]).unary("/containerd.services.version.v1.Version/Version", b"", [])
    assert version_pb2.VersionResponse.FromString(raw).revision == "runtimed"

    async def call():
        from grpclib.client import Channel
        from grpclib.const import Cardinality

        ch = Channel(path=served[0])
        try:
            async with ch.request("/containerd.services.version.v1.Version/Version",
                                  Cardinality.UNARY_UNARY, empty_pb2.Empty,
                                  version_pb2.VersionResponse) as stream:
                await stream.send_message(empty_pb2.Empty(), end=True)
                return await stream.recv_message()
        finally:
            ch.close()

    assert asyncio.run(call()).revision == "runtimed"


def test_metadata_reaches_the_handler(channel):
    reply = _unary(channel, "Metadata")(b"", metadata=[("containerd-namespace", "ns1"),
                                                         ("blob-bin", b"\x00\xff")])
    seen = dict(eval(reply.decode()))  # noqa: S307 - our own handler's repr
    assert seen["containerd-namespace"] == "ns1"
    assert seen["blob-bin"] == b"\x00\xff"
    assert "te" not in seen and "content-type" not in seen


def test_streams_every_shape(channel):
    chunks = channel.unary_stream(f"/{SERVICE}/Chunks")
    assert [len(c) for c in chunks(b"3 100000")] == [100000] * 3
    writes = channel.unary_stream(f"/{SERVICE}/Writes")
    assert list(writes(b"a bb ccc")) == [b"a", b"bb", b"ccc"]
    bidi = channel.stream_stream(f"/{SERVICE}/Bidi")
    assert list(bidi(iter([b"x", b"yz", b""]))) == [b"X", b"YZ", b""]


def test_client_stream_many_megabytes(served, channel):
    _set(served[3], served[1].read_gate)
    total = channel.stream_unary(f"/{SERVICE}/Total")
    # 24 MiB through a 4 MiB stream window: the window is given back as the handler reads
    assert total(iter([b"m" * (512 << 10)] * 48)) == f"48 {48 * (512 << 10)}".encode()


# statuses -----------------------------------------------------------------------------------

def test_a_table_of_its_own_handlers_without_grpcio(tmp_path):
    """The shim's shape: a plain `methods` dict of h2server.MethodHandler (no `service`
    fallback, no grpcio), aborts with h2server.StatusCode, typed statuses and a
    stream on the wire, an unknown method UNIMPLEMENTED, a body that does not parse
    INTERNAL."""
    from runtimed.services import h2server

    async def get(request, context):
        if request.version == "missing":
            await context.abort(h2server.StatusCode.NOT_FOUND, "no such thing: é")
        return version_pb2.VersionResponse(version=request.version.upper())

    async def each(request, context):
        for word in request.version.split():
            yield version_pb2.VersionResponse(version=word)

    class Table:
        methods = {
            "/t.T/Get": h2server.unary_unary(get, version_pb2.VersionResponse.FromString,
                                             version_pb2.VersionResponse.SerializeToString),
            "/t.T/Each": h2server.unary_stream(each, version_pb2.VersionResponse.FromString,
                                               version_pb2.VersionResponse.SerializeToString),
        }

    path = str(tmp_path / "own.sock")
    loop = asyncio.new_event_loop()
    server = Server(Table(), name="the test server")
    loop.run_until_complete(server.start(path))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with grpc.insecure_channel(f"unix://{path}") as ch:
            request = version_pb2.VersionResponse
            get_call = ch.unary_unary("/t.T/Get", request_serializer=request.SerializeToString,
                                      response_deserializer=request.FromString)
            assert get_call(request(version="x"), timeout=10) == request(version="X")
            with pytest.raises(grpc.RpcError) as err:
                get_call(request(version="missing"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no such thing: é"
            each_call = ch.unary_stream("/t.T/Each", request_serializer=request.SerializeToString,
                                        response_deserializer=request.FromString)
            assert [r.version for r in each_call(request(version="a b c"), timeout=10)] == ["a", "b", "c"]
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary("/t.T/Nothing")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary("/t.T/Get")(b"\xff\xff", timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()



def test_a_handler_runs_in_a_task_from_its_first_wait(channel):
    eager = sys.version_info >= (3, 12)
    assert _unary(channel, "InTask")(b"") == f"{eager} True".encode()


def test_unknown_method_is_unimplemented(channel):
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/no.such.Service/Nothing")(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_method_the_service_left_out_is_unimplemented(channel):
    from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc

    stub = events_pb2_grpc.EventsStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Publish(events_pb2.PublishRequest(topic="/x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as err:
        next(stub.Subscribe(events_pb2.SubscribeRequest()))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_abort_message_survives_percent_encoding(channel):
    message = "no such thing: é 100% \"x\"\nnext line"
    with pytest.raises(grpc.RpcError) as err:
        _unary(channel, "Abort")(message.encode())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == message


def test_status_codes_are_grpcs():
    from runtimed.services.h2server import StatusCode

    assert [(c.name, c.value) for c in StatusCode] == [(c.name, c.value) for c in grpc.StatusCode]


def test_percent_encode():
    assert percent_encode("plain text: ok") == "plain text: ok"
    assert percent_encode("50%") == "50%25"
    assert percent_encode("é\n") == "%C3%A9%0A"


def test_parse_timeout():
    assert parse_timeout("100m") == pytest.approx(0.1)
    assert parse_timeout("2S") == 2.0
    assert parse_timeout("1H") == 3600.0
    for bad in ("", "m", "10", "123456789S", "1x", "-1S"):
        with pytest.raises(ValueError):
            parse_timeout(bad)


def test_malformed_body_is_internal(channel):
    version_call = channel.unary_unary("/containerd.services.version.v1.Version/Version")
    with pytest.raises(grpc.RpcError) as err:
        version_call(b"\x0a\xff\xff\xff")  # a length-delimited field running past the end
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "malformed request" in err.value.details()


def test_compression_is_unimplemented(channel):
    with pytest.raises(grpc.RpcError) as err:
        _unary(channel, "Echo")(b"x" * 1000, compression=grpc.Compression.Gzip)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_message_size_limits(channel):
    with pytest.raises(grpc.RpcError) as err:
        _unary(channel, "Echo")(b"x" * (LIMIT + 1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        _unary(channel, "Big")(b"")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _unary(channel, "Echo")(b"still fine") == b"still fine"


def test_deadline_cancels_the_handler(served, channel):
    with pytest.raises(grpc.RpcError) as err:
        _unary(channel, "Hold")(b"", timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert served[1].cancelled.wait(10)


# a raw HTTP/2 peer ----------------------------------------------------------------------------

class Peer:
    """An HTTP/2 client speaking frames by hand (ctl.client.wire's codec)."""

    def __init__(self, path: str, settings: bytes = b""):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buffer = bytearray()
        self.decoder = http2.HeaderDecoder()
        self.sock.sendall(http2.PREFACE + http2.encode_frame(http2.SETTINGS, 0, 0, settings))

    def send(self, kind: int, flags: int, stream: int, payload: bytes = b"") -> None:
        self.sock.sendall(http2.encode_frame(kind, flags, stream, payload))

    def call(self, stream: int, path: str, extra=(), end: bool = False) -> None:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers"),
                   *extra]
        self.send(http2.HEADERS, http2.END_HEADERS | (http2.END_STREAM if end else 0), stream,
                  http2.encode_headers(headers))

    def message(self, stream: int, body: bytes, end: bool = True) -> None:
        self.send(http2.DATA, http2.END_STREAM if end else 0, stream,
                  b"\x00" + len(body).to_bytes(4, "big") + body)

    def read(self) -> tuple[int, int, int, bytes] | None:
        """The next frame, header blocks decoded into a dict; None at EOF."""
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.buffer += data
        length = int.from_bytes(self.buffer[:3], "big")
        kind, flags = self.buffer[3], self.buffer[4]
        stream = int.from_bytes(self.buffer[5:9], "big")
        payload = bytes(self.buffer[9:9 + length])
        del self.buffer[:9 + length]
        if kind == http2.HEADERS:
            payload = dict(self.decoder.decode(payload))
        return kind, flags, stream, payload

    def until(self, kind: int, stream: int | None = None, seen: list | None = None):
        while True:
            frame = self.read()
            assert frame is not None, "connection closed"
            if seen is not None:
                seen.append(frame)
            if frame[0] == kind and (stream is None or frame[2] == stream):
                return frame

    def sync(self, seen: list | None = None) -> None:
        """Returns once the server has handled everything sent before (a PING round trip)."""
        self.send(http2.PING, 0, 0, b"syncsync")
        while True:
            frame = self.until(http2.PING, 0, seen)
            if frame[1] & http2.ACK and frame[3] == b"syncsync":
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peer(served):
    p = Peer(served[0])
    yield p
    p.close()


def test_settings_and_ping(peer):
    kind, flags, _, payload = peer.read()
    assert kind == http2.SETTINGS and not flags & http2.ACK
    settings = {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                for i in range(0, len(payload), 6)}
    assert settings[http2.SETTINGS_MAX_FRAME_SIZE] >= 1 << 20
    assert settings[http2.SETTINGS_INITIAL_WINDOW_SIZE] == STREAM_WINDOW
    assert peer.until(http2.SETTINGS)[1] & http2.ACK  # ours acknowledged
    peer.send(http2.PING, 0, 0, b"12345678")
    assert peer.until(http2.PING)[1:] == (http2.ACK, 0, b"12345678")


def test_unary_without_a_message_is_internal(peer):
    peer.call(1, f"/{SERVICE}/Echo", end=True)
    _, flags, _, headers = peer.until(http2.HEADERS, 1)
    assert flags & http2.END_STREAM
    assert headers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])


def test_padding_and_priority_fields_are_stripped(peer):
    headers = http2.encode_headers([(":method", "POST"), (":scheme", "http"),
                                    (":path", f"/{SERVICE}/Echo"), (":authority", "x"),
                                    ("content-type", "application/grpc")])
    pad = 3
    peer.send(http2.HEADERS, http2.END_HEADERS | http2.PADDED | http2.PRIORITY_FLAG, 1,
              bytes([pad]) + b"\x00\x00\x00\x00\x10" + headers + b"\x00" * pad)
    peer.send(http2.DATA, http2.END_STREAM | http2.PADDED, 1,
              bytes([pad]) + b"\x00\x00\x00\x00\x02hi" + b"\x00" * pad)
    kind, _, _, payload = peer.until(http2.DATA, 1)
    assert payload == b"\x00\x00\x00\x00\x02hi"
    assert peer.until(http2.HEADERS, 1)[3]["grpc-status"] == "0"


def test_bad_padding_ends_the_connection(peer):
    peer.call(1, f"/{SERVICE}/Echo")
    peer.send(http2.DATA, http2.END_STREAM | http2.PADDED, 1, b"\x09abc")  # pads past the end
    _, _, _, payload = peer.until(http2.GOAWAY)
    assert int.from_bytes(payload[4:8], "big") == 0x1  # PROTOCOL_ERROR


def test_not_grpc_is_refused_by_http_status(peer):
    peer.send(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, http2.encode_headers(
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]))
    assert peer.until(http2.HEADERS, 1)[3][":status"] == "405"


def test_rst_stream_cancels_the_handler(served, peer):
    peer.call(1, f"/{SERVICE}/Hold")
    peer.message(1, b"")
    assert served[1].started.wait(10)
    peer.send(http2.RST_STREAM, 0, 1, http2.CANCEL_ERROR.to_bytes(4, "big"))
    assert served[1].cancelled.wait(10)
    peer.call(3, f"/{SERVICE}/Echo")  # the connection carries on
    peer.message(3, b"after")
    assert peer.until(http2.DATA, 3)[3] == b"\x00\x00\x00\x00\x05after"


def test_connection_loss_cancels_the_handler(served, peer):
    peer.call(1, f"/{SERVICE}/Hold")
    peer.message(1, b"")
    assert served[1].started.wait(10)
    peer.close()
    assert served[1].cancelled.wait(10)


def test_client_stream_back_pressure(served, peer):
    """While the handler does not read, the server stops giving the client window: what it
    buffers for a stream stays bounded (about 1.5 stream windows)."""
    peer.call(1, f"/{SERVICE}/Total")
    assert served[1].started.wait(10)
    piece = b"\x00" + (16 << 10).to_bytes(4, "big") + b"p" * (16 << 10)
    window, sent = STREAM_WINDOW, 0
    while True:
        while window >= len(piece):
            peer.send(http2.DATA, 0, 1, piece)
            window -= len(piece)
            sent += len(piece)
        seen: list = []
        peer.sync(seen)
        granted = sum(int.from_bytes(f[3], "big") for f in seen if f[0] == http2.WINDOW_UPDATE and f[2] == 1)
        if not granted:
            break
        window += granted
        assert sent < 4 * STREAM_WINDOW
    assert sent <= 2 * STREAM_WINDOW
    _set(served[3], served[1].read_gate)  # the handler reads: window comes back
    assert int.from_bytes(peer.until(http2.WINDOW_UPDATE, 1)[3], "big") > 0
    peer.send(http2.DATA, http2.END_STREAM, 1, piece)
    pieces = sent // len(piece) + 1
    data = peer.until(http2.DATA, 1)[3]
    assert data[5:] == f"{pieces} {pieces * (16 << 10)}".encode()


def test_server_stream_respects_the_client_window(peer):
    peer.call(1, f"/{SERVICE}/Chunks")
    peer.message(1, b"4 100000")
    received = 0
    while received < http2.DEFAULT_WINDOW:
        kind, _, stream, payload = peer.read()
        if kind == http2.DATA and stream == 1:
            received += len(payload)
    seen: list = []
    peer.sync(seen)
    assert received == http2.DEFAULT_WINDOW
    assert not [f for f in seen if f[0] == http2.DATA]
    more = (1 << 20).to_bytes(4, "big")
    peer.send(http2.WINDOW_UPDATE, 0, 0, more)
    peer.send(http2.WINDOW_UPDATE, 0, 1, more)
    while True:
        kind, flags, stream, payload = peer.read()
        if kind == http2.DATA and stream == 1:
            received += len(payload)
        if kind == http2.HEADERS and stream == 1:
            assert payload["grpc-status"] == "0" and flags & http2.END_STREAM
            break
    assert received == 4 * (100000 + 5)


def test_streams_held_by_a_full_socket_all_resume(served):
    """Several server streams wait for the socket's buffer to drain at once (a client that
    reads slowly, as `ctr push` reading three layers): every one of them must go on when
    it drains, not only the last to wait (a hang seen with `ctr push` of a big image), and
    one of them giving up must not end the others."""
    windows = http2.SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + (1 << 30).to_bytes(4, "big")
    peer = Peer(served[0], windows)
    try:
        peer.send(http2.WINDOW_UPDATE, 0, 0, ((1 << 31) - 1 - http2.DEFAULT_WINDOW).to_bytes(4, "big"))
        streams = (1, 3, 5, 7)
        for sid in streams:
            peer.call(sid, f"/{SERVICE}/Chunks")
            peer.message(sid, b"40 100000")  # 4 MB each: far more than the socket buffers
        time.sleep(0.5)  # not reading: the server's transport pauses with all four sending
        peer.send(http2.RST_STREAM, 0, 1, http2.CANCEL_ERROR.to_bytes(4, "big"))  # one gives up
        done = {1}
        while done != set(streams):
            frame = peer.read()
            assert frame is not None, "connection closed"
            kind, flags, sid, payload = frame
            if kind == http2.HEADERS and flags & http2.END_STREAM and sid != 1:
                assert payload["grpc-status"] == "0", payload
                done.add(sid)
    finally:
        peer.close()


def test_compressed_message_without_encoding_is_internal(peer):
    peer.call(1, f"/{SERVICE}/Echo")
    peer.send(http2.DATA, http2.END_STREAM, 1, b"\x01\x00\x00\x00\x01z")
    headers = peer.until(http2.HEADERS, 1)[3]
    assert headers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])


def test_stop_sends_goaway_and_drains(served, peer):
    _, handlers, server, loop = served
    peer.call(1, f"/{SERVICE}/Hold")
    peer.message(1, b"")
    assert handlers.started.wait(10)
    stopped = asyncio.run_coroutine_threadsafe(server.stop(30), loop)
    _, _, _, payload = peer.until(http2.GOAWAY)
    assert int.from_bytes(payload[:4], "big") == 1  # the last stream it will serve
    assert int.from_bytes(payload[4:8], "big") == 0  # NO_ERROR
    peer.call(3, f"/{SERVICE}/Echo")  # too late: refused
    assert peer.until(http2.RST_STREAM, 3)[3] == (0x7).to_bytes(4, "big")
    _set(loop, handlers.release)  # the call in flight still completes
    data = peer.until(http2.DATA, 1)[3]
    assert data[5:] == b"released"
    assert peer.until(http2.HEADERS, 1)[3]["grpc-status"] == "0"
    stopped.result(10)
    while peer.read() is not None:
        pass  # then the server closes the connection
    with socket.socket(socket.AF_UNIX) as late, pytest.raises(OSError):
        late.connect(served[0])


def test_stop_cancels_what_outlives_the_grace(served, peer):
    _, handlers, server, loop = served
    peer.call(1, f"/{SERVICE}/Hold")
    peer.message(1, b"")
    assert handlers.started.wait(10)
    asyncio.run_coroutine_threadsafe(server.stop(0.1), loop).result(10)
    assert handlers.cancelled.is_set()
    headers = peer.until(http2.HEADERS, 1)[3]
    assert headers["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])


def test_messages_split_anywhere_between_frames(served):
    """Prefixes and messages cut at any point across DATA frames, several in one frame."""
    big_window = (http2.SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + (1 << 24).to_bytes(4, "big"))
    peer = Peer(served[0], big_window)
    try:
        peer.send(http2.WINDOW_UPDATE, 0, 0, (1 << 24).to_bytes(4, "big"))
        messages = [b"a", b"", b"x" * 70000, b"bc", b"d" * 5]
        body = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)
        peer.call(1, f"/{SERVICE}/Bidi")
        cuts = [0, 3, 4, 11, 20000, 70010, len(body)]
        for start, stop in zip(cuts, cuts[1:], strict=False):
            peer.send(http2.DATA, http2.END_STREAM if stop == len(body) else 0, 1, body[start:stop])
        received = bytearray()
        while True:
            kind, _, stream, payload = peer.read()
            if kind == http2.DATA and stream == 1:
                received += payload
            elif kind == http2.HEADERS and stream == 1 and "grpc-status" in payload:
                assert payload["grpc-status"] == "0"
                break
        assert received == b"".join(b"\x00" + len(m).to_bytes(4, "big") + m.upper() for m in messages)
    finally:
        peer.close()


def test_request_ending_inside_a_message_is_internal(served, peer):
    _set(served[3], served[1].read_gate)
    peer.call(1, f"/{SERVICE}/Total")
    peer.send(http2.DATA, http2.END_STREAM, 1, b"\x00\x00\x00\x00\x09abc")
    headers = peer.until(http2.HEADERS, 1)[3]
    assert headers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])


def test_no_call_state_outlives_its_call(served, channel):
    """After calls that end every way (answered, aborted, refused, past their deadline,
    reset, streamed), the server holds no stream and no task."""
    path, handlers, server, loop = served
    _set(loop, handlers.read_gate)
    _unary(channel, "Echo")(b"x")
    with pytest.raises(grpc.RpcError):
        _unary(channel, "Abort")(b"no")
    with pytest.raises(grpc.RpcError):
        _unary(channel, "Echo")(b"x" * (LIMIT + 1))
    with pytest.raises(grpc.RpcError):
        _unary(channel, "Hold")(b"", timeout=0.1)
    assert list(channel.unary_stream(f"/{SERVICE}/Chunks")(b"2 10")) == [b"c" * 10] * 2
    assert channel.stream_unary(f"/{SERVICE}/Total")(iter([b"a", b"b"])) == b"2 2"
    stream = channel.unary_stream(f"/{SERVICE}/Chunks")(b"1000 100000")
    next(stream)
    stream.cancel()
    peer = Peer(path)
    peer.call(1, f"/{SERVICE}/Hold")
    peer.message(1, b"")
    peer.send(http2.RST_STREAM, 0, 1, http2.CANCEL_ERROR.to_bytes(4, "big"))
    peer.sync()
    peer.close()

    async def held():
        await asyncio.sleep(0.01)
        return [len(c.streams) for c in server.connections], len(server.tasks)

    for _ in range(100):  # the cancellations above finish on the server's loop
        state = asyncio.run_coroutine_threadsafe(held(), loop).result(10)
        if state == ([0] * len(state[0]), 0):
            break
    assert state == ([0] * len(state[0]), 0)
