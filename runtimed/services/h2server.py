"""The gRPC server of the daemon and of every shim: gRPC over HTTP/2 on a unix socket, as
an asyncio Protocol.

Why not grpc.aio: a warm unary call cost its server ~0.26 ms of CPU and ~10 context
switches (grpc's C core hands each call between its own threads and the event loop),
more than the whole round trip containerd's Go server takes. Here the event loop's thread
reads the socket, parses the frames and runs the handler: ~0.1 ms of CPU and two context
switches per call (docs/architecture.md, "Two gRPC stacks, one wire").

It serves the daemon's `MethodTable` (grpc.RpcMethodHandler records, as grpc.aio would)
and the shim's table (this module's `MethodHandler`: the same fields, no grpcio, which the
shim must not import: 20 MB and threads) with a `Context` that has the part of grpc.aio's
ServicerContext the services use, so the services do not know which server runs them. What it speaks: HTTP/2
(RFC 9113) without TLS, priorities or push; flow control both ways; HPACK decoding with
runtimed/http2.py's decoder and literal-only encoding; gRPC's length-prefixed messages,
grpc-timeout deadlines, percent-encoded grpc-message; no compression (a compressed
request is refused with UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import enum
import inspect
import logging
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runtimed.http2 import (
    ACK,
    CODES,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    NO_ERROR,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RECEIVE_FRAME_SIZE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    HeaderDecoder,
    ProtocolError,
    RpcError,
    encode_frame,
    encode_headers,
    encode_settings,
    settings,
    unpad,
)

log = logging.getLogger("runtimed.grpc")

STREAM_WINDOW = 4 << 20  # how far a client may stream ahead of its handler
FLUSH_SIZE = 256 << 10  # frames held for one write at most


# gRPC's status codes as grpc.StatusCode spells them (same names, same `(code, text)`
# values), so that the shim, which must not import grpcio, has them too. A handler may pass
# either enum to `Context.abort`/`set_code`: only `.value[0]` goes on the wire.
StatusCode = enum.Enum("StatusCode", {name: (number, name.lower().replace("_", " "))
                                      for number, name in enumerate(CODES)})


class AbortError(Exception):
    """What `Context.abort` raises to end the handler (grpc.aio raises its own AbortError)."""


@dataclass(slots=True)
class MethodHandler:
    """One method as the server runs it: the fields of grpc.RpcMethodHandler, which the
    daemon's MethodTable holds and the server takes as they are (duck typing); the shim,
    which imports no grpcio, builds these (`unary_unary`/`unary_stream`)."""

    request_streaming: bool
    response_streaming: bool
    request_deserializer: Callable[[bytes], Any] | None
    response_serializer: Callable[[Any], bytes] | None
    unary_unary: Callable | None = None
    unary_stream: Callable | None = None
    stream_unary: Callable | None = None
    stream_stream: Callable | None = None


def unary_unary(behaviour, request_deserializer=None, response_serializer=None) -> MethodHandler:
    return MethodHandler(False, False, request_deserializer, response_serializer, unary_unary=behaviour)


def unary_stream(behaviour, request_deserializer=None, response_serializer=None) -> MethodHandler:
    return MethodHandler(False, True, request_deserializer, response_serializer, unary_stream=behaviour)


def _is_ok(code) -> bool:
    return code.value[0] == 0


_RESPONSE_HEADERS = encode_headers([(":status", "200"), ("content-type", "application/grpc")])
_OK_TRAILERS = encode_headers([("grpc-status", "0")])
# request headers that are the protocol's, not the call's metadata
_RESERVED = frozenset(("content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
                       "user-agent", "content-length", "accept-encoding"))
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class _ConnectionError(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY `code`."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def percent_encode(text: str) -> str:
    """grpc-message's encoding: printable ASCII but '%' as is, every other UTF-8 octet %XX."""
    raw = text.encode("utf-8", errors="replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return text
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)


def parse_timeout(value: str) -> float:
    """grpc-timeout (`100m`, `5S`: at most 8 digits and a unit) in seconds; ValueError if bad."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        raise ValueError(value)
    return int(digits) * _TIMEOUT_UNITS[unit]


class Context:
    """What a handler sees of its call: the part of grpc.aio.ServicerContext runtimed uses."""

    __slots__ = ("_stream", "code", "details")

    def __init__(self, stream: Stream):
        self._stream = stream
        self.code: StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._stream.metadata

    async def abort(self, code: StatusCode, details: str = "", trailing_metadata=()) -> None:
        self.code, self.details = code, details
        raise AbortError(details)

    def set_code(self, code: StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def write(self, message) -> None:
        await self._stream.send_message(message)

    def peer(self) -> str:
        return "unix:"

    def time_remaining(self) -> float | None:
        deadline = self._stream.deadline
        if deadline is None:
            return None
        return max(0.0, deadline - self._stream.conn.loop.time())

    def cancelled(self) -> bool:
        return self._stream.cancelled

    def done(self) -> bool:
        return self._stream.finished


class _TooLarge(Exception):
    pass


class Stream:
    """One call: its request messages in, its responses and status out."""

    __slots__ = ("id", "conn", "handler", "metadata", "deadline", "send_window", "headers_sent",
                 "closed_remote", "cancelled", "finished", "task", "prefix", "message", "filled", "queue", "queued",
                 "unacked", "waiter", "window_waiter", "timer", "header_block", "end_with_headers")

    def __init__(self, conn: Connection, sid: int):
        self.id = sid
        self.conn = conn
        self.handler: MethodHandler | None = None
        self.metadata: tuple = ()
        self.deadline: float | None = None
        self.send_window = conn.peer_initial_window
        self.headers_sent = False
        self.closed_remote = False  # the client ended its request stream
        self.cancelled = False  # the client reset the stream, or went away
        self.finished = False  # the status is sent (or the stream is gone)
        self.task: asyncio.Task | None = None
        self.prefix = bytearray()  # a message's 5-byte prefix, while split between frames
        self.message: bytearray | None = None  # a message that spans frames, being filled
        self.filled = 0
        self.queue: deque[bytes | bytearray] = deque()  # whole request messages not yet taken
        self.queued = 0
        self.unacked = 0  # received bytes not yet given back to the client as window
        self.waiter: asyncio.Future | None = None  # the handler, for a request message
        self.window_waiter: asyncio.Future | None = None  # the handler, for send window
        self.timer: asyncio.TimerHandle | None = None
        self.header_block = bytearray()
        self.end_with_headers = False

    # receiving -----------------------------------------------------------------------------

    def data(self, payload: memoryview, size: int, end: bool) -> None:
        """A DATA frame's payload (a view the caller reuses: copied here, once). A message
        in one frame is cut out of it; a longer one is filled into a buffer of its size."""
        self.unacked += size
        pos, available = 0, len(payload)
        while pos < available:
            message = self.message
            if message is not None:  # a message begun in an earlier frame
                take = min(available - pos, len(message) - self.filled)
                message[self.filled:self.filled + take] = payload[pos:pos + take]
                self.filled += take
                pos += take
                if self.filled == len(message):
                    self.message = None
                    self._queue(message)
                continue
            prefix = self.prefix
            if prefix or available - pos < 5:  # a prefix split between frames
                take = min(5 - len(prefix), available - pos)
                prefix += payload[pos:pos + take]
                pos += take
                if len(prefix) < 5:
                    break
                compressed, length = prefix[0], int.from_bytes(prefix[1:5], "big")
                prefix.clear()
            else:
                compressed = payload[pos]
                length = int.from_bytes(payload[pos + 1:pos + 5], "big")
                pos += 5
            if compressed:
                self.fail(StatusCode.INTERNAL,
                          "compressed request message, but the call named no grpc-encoding")
                return
            limit = self.conn.server.max_message_size
            if length > limit:
                self.fail(StatusCode.RESOURCE_EXHAUSTED,
                          f"Received message larger than max ({length} vs. {limit})")
                return
            if available - pos >= length:
                self._queue(payload[pos:pos + length].tobytes())
                pos += length
            else:
                self.message = bytearray(length)
                self.filled = 0
        if end:
            self.closed_remote = True
        else:
            self._give_window()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _queue(self, message: bytes | bytearray) -> None:
        self.queue.append(message)
        self.queued += 5 + len(message)

    def _give_window(self) -> None:
        """Window back to the client once a quarter of it is used, unless the handler is
        behind (then when it catches up): back-pressure on a client stream."""
        if self.unacked >= STREAM_WINDOW // 4 and self.queued < STREAM_WINDOW // 2:
            self.conn.write(encode_frame(WINDOW_UPDATE, 0, self.id, self.unacked.to_bytes(4, "big")))
            self.unacked = 0

    async def next_request(self) -> bytes | bytearray | None:
        """The next request message, or None once the request stream ended."""
        while not self.queue:
            if self.closed_remote or self.finished:
                if (self.message is not None or self.prefix) and not self.finished:
                    raise _Malformed("the request stream ended inside a message")
                return None
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.queue.popleft()
        self.queued -= 5 + len(message)
        if not self.closed_remote:
            self._give_window()
        return message

    # sending ---------------------------------------------------------------------------------

    async def send_message(self, message) -> None:
        if self.finished:
            raise asyncio.CancelledError  # the client is gone: end the handler
        serializer = self.handler.response_serializer
        body = serializer(message) if serializer is not None else message
        limit = self.conn.server.max_message_size
        if len(body) > limit:
            raise _TooLarge(f"Sent message larger than max ({len(body)} vs. {limit})")
        conn = self.conn
        frame_limit = conn.peer_max_frame
        size = 5 + len(body)
        if not self.headers_sent:
            self.headers_sent = True
            conn.write(encode_frame(HEADERS, END_HEADERS, self.id, _RESPONSE_HEADERS))
        if size <= frame_limit and size <= conn.send_window and size <= self.send_window:
            conn.send_window -= size
            self.send_window -= size
            conn.write(size.to_bytes(3, "big") + b"\x00\x00" + self.id.to_bytes(4, "big")
                       + b"\x00" + len(body).to_bytes(4, "big") + body)
        else:
            await self._send_frames(memoryview(b"\x00" + len(body).to_bytes(4, "big") + body))
        if conn.paused:
            await conn.drain()

    async def _send_frames(self, view: memoryview) -> None:
        conn = self.conn
        while len(view):
            allowed = min(conn.send_window, self.send_window, conn.peer_max_frame, len(view))
            if allowed <= 0:
                self.window_waiter = conn.loop.create_future()
                try:
                    await self.window_waiter
                finally:
                    self.window_waiter = None
                if self.finished:
                    raise asyncio.CancelledError
                continue
            conn.send_window -= allowed
            self.send_window -= allowed
            conn.write(allowed.to_bytes(3, "big") + b"\x00\x00" + self.id.to_bytes(4, "big"))
            conn.write(view[:allowed])
            view = view[allowed:]
            if conn.paused:
                await conn.drain()
                if self.finished:
                    raise asyncio.CancelledError

    def send_status(self, code: StatusCode, details: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if not details and _is_ok(code):
            block = _OK_TRAILERS
        else:
            trailers = [("grpc-status", str(code.value[0]))]
            if details:
                trailers.append(("grpc-message", percent_encode(details)))
            block = encode_headers(trailers)
        if not self.headers_sent:
            self.headers_sent = True
            block = _RESPONSE_HEADERS + block  # trailers-only response
        frames = encode_frame(HEADERS, END_HEADERS | END_STREAM, self.id, block)
        if not self.closed_remote:  # answered before the request ended: the client may stop
            frames += encode_frame(RST_STREAM, 0, self.id, NO_ERROR.to_bytes(4, "big"))
        conn.write(frames)
        self._done()

    def fail(self, code: StatusCode, details: str) -> None:
        """End the call from the connection's side (a bad request, a deadline)."""
        self.send_status(code, details)
        self.cancel()

    def cancel(self) -> None:
        """The client reset the stream or went away (or the call failed): stop the handler."""
        self.cancelled = True
        self.finished = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for waiter in (self.waiter, self.window_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._done()

    def expire(self) -> None:
        self.timer = None
        if not self.finished:
            self.fail(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.conn.streams.pop(self.id, None)


class _Malformed(Exception):
    pass


class Connection(asyncio.Protocol):
    """One client connection: frames in, frames out, a Stream per call."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.decoder = HeaderDecoder()
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.received = 0  # bytes since our last connection WINDOW_UPDATE
        self.paused = False
        self.out: list[bytes | memoryview] = []  # frames not yet handed to the transport
        self.out_size = 0
        self.drain_waiter: asyncio.Future | None = None
        self.continuation: Stream | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        settings = encode_settings(
            (SETTINGS_MAX_FRAME_SIZE, RECEIVE_FRAME_SIZE),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
        )
        transport.write(encode_frame(SETTINGS, 0, 0, settings)
                        + encode_frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.cancel()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport takes writes again. Every stream sending on this
        connection may wait here at once: they share one future (with one each, only the
        last to wait would be woken), shielded so that a cancelled stream does not cancel
        it under the others."""
        while self.paused and not self.closed:
            if self.drain_waiter is None or self.drain_waiter.done():
                self.drain_waiter = self.loop.create_future()
            await asyncio.shield(self.drain_waiter)

    def write(self, data: bytes | memoryview) -> None:
        """Frames go out together at the end of the loop's current round (one sendmsg for
        a unary call's headers, message and trailers instead of three writes)."""
        if self.closed:
            return
        out = self.out
        out.append(data)
        self.out_size += len(data)
        if len(out) == 1:
            self.loop.call_soon(self.flush)
        elif self.out_size >= FLUSH_SIZE:
            self.flush()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def flush(self) -> None:
        out = self.out
        if out and not self.closed and not self.transport.is_closing():
            self.transport.writelines(out)
        out.clear()
        self.out_size = 0

    def goaway(self, code: int, message: str = "") -> None:
        self.write(encode_frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big") + code.to_bytes(4, "big")
                          + message.encode()))

    def data_received(self, data: bytes) -> None:
        if self.buffer:  # the rest of a frame that began in an earlier read
            self.buffer += data
            data = self.buffer
            self.buffer = bytearray()
        if not self.preface:
            if len(data) < len(PREFACE):
                self.buffer = bytearray(data)
                return
            if data[:len(PREFACE)] != PREFACE:
                self.transport.close()
                return
            self.preface = True
            data = data[len(PREFACE):]
        with memoryview(data) as view:
            pos, end = 0, len(view)
            try:
                while end - pos >= 9:
                    length = int.from_bytes(view[pos:pos + 3], "big")
                    if length > RECEIVE_FRAME_SIZE:
                        raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                    if end - pos < 9 + length:
                        break
                    kind, flags = view[pos + 3], view[pos + 4]
                    sid = int.from_bytes(view[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                    payload = view[pos + 9:pos + 9 + length]
                    pos += 9 + length
                    if kind == DATA:  # the payload is copied once, by its stream
                        if self.continuation is not None:
                            raise _ConnectionError(PROTOCOL_ERROR, "DATA inside a header block")
                        self._data(flags, sid, payload)
                    else:
                        self.frame(kind, flags, sid, payload.tobytes())
                    payload.release()
            except _ConnectionError as exc:
                self.abandon(exc.code, str(exc))
                return
            except ProtocolError as exc:  # bad padding
                self.abandon(PROTOCOL_ERROR, exc.details)
                return
            except RpcError as exc:  # the HPACK decoder's
                self.abandon(COMPRESSION_ERROR, exc.details)
                return
            if pos < end:
                self.buffer = bytearray(view[pos:])

    def abandon(self, code: int, message: str) -> None:
        log.warning("gRPC connection closed: %s", message)
        self.goaway(code, message)
        self.close()

    def frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.continuation is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block without its CONTINUATION")
        if kind == HEADERS:
            self._headers(flags, sid, payload)
        elif kind == CONTINUATION:
            stream = self.continuation
            if stream is None or stream.id != sid:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION of no header block")
            stream.header_block += payload
            if flags & END_HEADERS:
                self.continuation = None
                self._header_block(stream)
        elif kind == SETTINGS:
            if sid:
                raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & ACK:
                self._settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self.write(encode_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if sid == 0:
                self.send_window += increment
                if self.send_window > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
                for stream in list(self.streams.values()):
                    _wake(stream.window_waiter)
            else:
                stream = self.streams.get(sid)
                if stream is not None:
                    stream.send_window += increment
                    _wake(stream.window_waiter)
        elif kind == RST_STREAM:
            stream = self.streams.get(sid)
            if stream is not None:
                stream.cancel()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # GOAWAY from a client: it starts no more streams, the ones it has run out; PRIORITY
        # and unknown frame types are ignored

    def _data(self, flags: int, sid: int, payload: memoryview) -> None:
        size = len(payload)  # flow control counts the padding too
        payload = unpad(flags, payload)
        self.received += size
        if self.received >= MAX_WINDOW // 4:
            self.write(encode_frame(WINDOW_UPDATE, 0, 0, self.received.to_bytes(4, "big")))
            self.received = 0
        stream = self.streams.get(sid)
        if stream is None or stream.closed_remote:
            return  # a stream that ended (reset, or answered early): its data is dropped
        end = bool(flags & END_STREAM)
        stream.data(payload, size, end)
        if end and stream.task is None and stream.handler is not None and not stream.finished:
            self.server.start_call(stream)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        payload = unpad(flags, payload, priority=True)
        stream = self.streams.get(sid)
        if stream is None:
            if not sid & 1:
                raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on even stream {sid}")
            stream = Stream(self, sid)
            if sid > self.last_stream:
                self.last_stream = sid
                self.streams[sid] = stream
            else:
                stream.finished = True  # trailers of a stream we ended: decoded, then dropped
        stream.header_block = bytearray(payload)
        stream.end_with_headers = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._header_block(stream)
        else:
            self.continuation = stream

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        for key, value in settings(payload):
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in list(self.streams.values()):
                    stream.send_window += delta
                    _wake(stream.window_waiter)
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_max_frame = value
        self.write(encode_frame(SETTINGS, ACK, 0))

    def _header_block(self, stream: Stream) -> None:
        block = bytes(stream.header_block)
        stream.header_block = bytearray()
        headers = self.decoder.decode(block)  # always: it keeps the HPACK table in step
        if stream.finished or stream.handler is not None:
            if stream.end_with_headers and not stream.finished:  # trailers end the request
                stream.data(b"", 0, True)
                if stream.task is None:
                    self.server.start_call(stream)
            return
        if self.server.stopping:
            self.write(encode_frame(RST_STREAM, 0, stream.id, REFUSED_STREAM.to_bytes(4, "big")))
            stream.finished = True
            self.streams.pop(stream.id, None)
            return
        self.server.accept(stream, headers)


def _wake(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _Details:
    """What a grpc.GenericRpcHandler's `service` is asked with."""

    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, metadata: tuple):
        self.method = method
        self.invocation_metadata = metadata


class Server:
    """Serves `table`: a `methods` dict of path -> handler (a grpc.RpcMethodHandler or a
    MethodHandler) and optionally `service(details)` for a path not in it (MethodTable)."""

    def __init__(self, table, max_message_size: int = 16 << 20, name: str = "the daemon"):
        self.table = table
        self.name = name  # who is shutting down, in the status of calls cut short
        self.fallback = getattr(table, "service", None)
        self.max_message_size = max_message_size
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listener: asyncio.AbstractServer | None = None

    async def start(self, address: str | None = None, sock=None) -> None:
        """Listen on the unix socket `address`, or serve the listening socket `sock` (a
        shim worker serves its keeper's, shimd/keeper.py)."""
        self.loop = asyncio.get_running_loop()
        self.listener = await self.loop.create_unix_server(lambda: Connection(self), address,
                                                           sock=sock, backlog=128)

    def accept(self, stream: Stream, headers: list[tuple[str, str]]) -> None:
        """A new call's request headers: find its handler, or answer at once."""
        path = method = content_type = timeout = encoding = None
        metadata = []
        for name, value in headers:
            if name[0] == ":":
                if name == ":path":
                    path = value
                elif name == ":method":
                    method = value
            elif name not in _RESERVED:
                if name.endswith("-bin"):
                    try:
                        value = base64.b64decode(value + "=" * (-len(value) % 4))
                    except ValueError:
                        pass
                metadata.append((name, value))
            elif name == "content-type":
                content_type = value
            elif name == "grpc-timeout":
                timeout = value
            elif name == "grpc-encoding":
                encoding = value
        conn = stream.conn
        if stream.end_with_headers:
            stream.closed_remote = True
        if method != "POST" or not (content_type or "").startswith("application/grpc"):
            status = "405" if method != "POST" else "415"
            conn.write(encode_frame(HEADERS, END_HEADERS | END_STREAM, stream.id,
                              encode_headers([(":status", status)])))
            stream.cancel()
            return
        stream.metadata = tuple(metadata)
        handler = self.table.methods.get(path)
        if handler is None and path and self.fallback is not None:
            handler = self.fallback(_Details(path, stream.metadata))
        if handler is None:
            stream.fail(StatusCode.UNIMPLEMENTED, f"Method not found: {path}")
            return
        if encoding not in (None, "identity"):
            stream.fail(StatusCode.UNIMPLEMENTED,
                        f"grpc-encoding {encoding} is not supported (only identity)")
            return
        stream.handler = handler
        if timeout:
            try:
                seconds = parse_timeout(timeout)
            except ValueError:
                stream.fail(StatusCode.INTERNAL, f"malformed grpc-timeout {timeout!r}")
                return
            stream.deadline = self.loop.time() + seconds
            stream.timer = self.loop.call_later(seconds, stream.expire)
        if handler.request_streaming or stream.closed_remote:
            self.start_call(stream)

    def start_call(self, stream: Stream) -> None:
        """Run the call's handler at once, up to its first wait (an eager task): a call
        that never waits (Version, a cached Get) costs no loop round."""
        context = contextvars.copy_context()
        stream.task = _EAGER
        if _EAGER_TASKS is not None:
            task = _EAGER_TASKS(self.loop, self.run(stream), context=context)
            if task.done():
                return
        else:
            # Python 3.11 has no eager tasks: the first step runs outside any task, so
            # asyncio.current_task() is None and asyncio.timeout() refuses until the
            # handler's first wait (no handler of ours needs either that early)
            call = self.run(stream)
            try:
                waiting_on = context.run(call.send, None)
            except StopIteration:
                return
            if getattr(waiting_on, "_asyncio_future_blocking", False):
                # taken, as a task takes what an await yields: until this flag is down,
                # anyone else awaiting the same future fails ("await wasn't used with future")
                waiting_on._asyncio_future_blocking = False
            task = self.loop.create_task(_resume(call, waiting_on), context=context)
        stream.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if stream.cancelled:  # reset while its first step ran
            task.cancel()

    async def run(self, stream: Stream) -> None:
        """Run one call's handler and send what it answers."""
        handler = stream.handler
        context = Context(stream)
        try:
            if handler.request_streaming:
                request = _requests(stream, handler.request_deserializer)
            else:
                body = await stream.next_request()
                if body is None or stream.queue:
                    many = "no" if body is None else "more than one"
                    stream.send_status(StatusCode.INTERNAL, f"{many} request message in a unary call")
                    return
                deserializer = handler.request_deserializer
                try:
                    request = deserializer(body) if deserializer is not None else body
                except Exception as exc:  # noqa: BLE001 - INTERNAL, as gRPC-Go answers
                    stream.send_status(StatusCode.INTERNAL, f"malformed request: {exc}")
                    return
            if not handler.response_streaming:
                behaviour = handler.unary_unary or handler.stream_unary
                response = await behaviour(request, context)
                if response is None:
                    code = context.code
                    stream.send_status(code if code is not None and not _is_ok(code) else StatusCode.INTERNAL,
                                       context.details or "the handler returned no response")
                    return
                await stream.send_message(response)
            else:
                behaviour = handler.unary_stream or handler.stream_stream
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        await stream.send_message(item)
                elif result is not None:
                    await result
            stream.send_status(context.code or StatusCode.OK, context.details)
        except AbortError:
            stream.send_status(context.code or StatusCode.UNKNOWN, context.details)
        except asyncio.CancelledError:
            # the client reset the stream or went away (nothing to tell it), a deadline
            # passed (told already), or the server stops
            stream.send_status(StatusCode.UNAVAILABLE, f"{self.name} is shutting down")
        except _TooLarge as exc:
            stream.send_status(StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except _Malformed as exc:
            stream.send_status(StatusCode.INTERNAL, str(exc))
        except Exception as exc:  # noqa: BLE001 - a handler outside base.service's mapping
            if context.code is None:  # (a generated default sets UNIMPLEMENTED, then raises)
                log.exception("%s failed", handler)
            stream.send_status(context.code or StatusCode.UNKNOWN,
                               context.details or f"Unexpected {type(exc).__name__}: {exc}")
        finally:
            stream.finished = True
            stream._done()

    async def stop(self, grace: float | None) -> None:
        """GOAWAY to every client, calls in progress get `grace` seconds, then are cancelled."""
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            conn.goaway(NO_ERROR)
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1)
        for conn in list(self.connections):
            conn.close()


class _Eager:
    """Stands for the task of a call while its first step runs outside any task."""

    @staticmethod
    def done() -> bool:
        return False

    @staticmethod
    def cancel() -> None:
        pass


_EAGER = _Eager()
_EAGER_TASKS = getattr(asyncio, "eager_task_factory", None)  # Python >= 3.12


@types.coroutine
def _carry_on(call, waiting_on):
    """Drive `call`, whose first step ran outside a task and now waits on `waiting_on`,
    from the task that awaits this: what the task sends or throws goes to `call`."""
    if getattr(waiting_on, "_asyncio_future_blocking", None) is False:
        waiting_on._asyncio_future_blocking = True  # yielded by an await, for this task to take
    while True:
        try:
            value = yield waiting_on
        except BaseException as exc:  # noqa: BLE001 - handed to the call (cancellation)
            try:
                waiting_on = call.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting_on = call.send(value)
            except StopIteration as stop:
                return stop.value


async def _resume(call, waiting_on):
    return await _carry_on(call, waiting_on)


async def _requests(stream: Stream, deserializer):
    while True:
        body = await stream.next_request()
        if body is None:
            return
        yield deserializer(body) if deserializer is not None else body
