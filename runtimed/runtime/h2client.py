"""runtimed's gRPC client for its shims: HTTP/2 on a unix socket, on the event loop.

Why not grpc.aio: since the daemon serves its API with its own server
(runtimed/services/h2server.py), the shim client was the last user of grpc's C core in the
daemon, and every call to a shim crossed its threads: the request handed from the loop to
grpc's event engine, the answer back through its poller, ~10 context switches per call
(docs/architecture.md). Per exec (Exec, Start, Wait, Delete and four events) that was
about a quarter of the daemon's CPU, and on a busy machine every hand-over waited for a
core. Here the loop's thread writes the frames and an asyncio Protocol reads them.

What it speaks, to the shim's server (h2server, as the daemon's): HTTP/2 without TLS, priorities or push
(one connection per shim, a stream per call, any number at once), flow control both ways,
HPACK through ctl/client/wire.py's decoder and literal-only encoder, gRPC's 5-byte message
prefix, grpc-timeout deadlines, trailers (or trailers-only answers), RST_STREAM and
GOAWAY. No compression. A connection that is lost fails its calls with UNAVAILABLE; the
next call dials again. A connection no call has used for IDLE_CLOSE seconds is closed
(the channel stays usable: the next call dials again), so an idle shim serves no
connection and can let its API worker go.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from runtimed.http2 import (
    ACK,
    CANCEL_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    HTTP_CODES,
    MAX_WINDOW,
    PING,
    PREFACE,
    RECEIVE_FRAME_SIZE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    HeaderDecoder,
    RpcError,
    encode_frame,
    encode_headers,
    encode_settings,
    percent_decode,
    settings,
    status_name,
    unpad,
)

MAX_MESSAGE = 64 << 20
IDLE_CLOSE = 2.0  # seconds without a call before a channel closes its connection


class _Stream:
    """One call's receiving side: response messages as they complete, then the status."""

    def __init__(self, id: int, send_window: int):
        self.id = id
        self.send_window = send_window
        self.messages: deque[bytes] = deque()
        self.buffer = bytearray()
        self.block = bytearray()  # a header block still waiting for its CONTINUATION
        self.block_ends = False
        self.headers_seen = False
        self.error: RpcError | None = None
        self.done = False
        self.unacknowledged = 0
        self.changed = asyncio.Event()

    def finish(self, error: RpcError | None) -> None:
        if not self.done:
            self.done, self.error = True, error
        self.changed.set()


class _Connection(asyncio.Protocol):
    def __init__(self, address: str):
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.next_stream = 1
        self.decoder = HeaderDecoder()
        self.buffer = bytearray()
        self.usable = True
        self.lost = RpcError("UNAVAILABLE", f"connection to {address} closed")
        self.send_window = DEFAULT_WINDOW
        self.stream_window_initial = DEFAULT_WINDOW
        self.max_send_frame = 16384
        self.received = 0
        self.window_opened = asyncio.Event()
        self.orphan = _Stream(0, 0)  # header blocks of streams given up on: HPACK state

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = encode_settings(
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, RECEIVE_FRAME_SIZE),
        )
        transport.write(PREFACE + encode_frame(SETTINGS, 0, 0, settings) + encode_frame(
            WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))

    def connection_lost(self, exc) -> None:
        self.usable = False
        if exc is not None:
            self.lost = RpcError("UNAVAILABLE", f"connection to {self.address} lost: {exc}")
        for stream in list(self.streams.values()):
            stream.finish(self.lost)
        self.streams.clear()
        self.window_opened.set()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        try:
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags = buffer[3], buffer[4]
                stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload = bytes(buffer[9:9 + length])
                del buffer[:9 + length]
                self._frame(kind, flags, stream, payload)
        except RpcError as exc:  # the peer broke HTTP/2 or HPACK: nothing is sound
            self.lost = RpcError("UNAVAILABLE", f"connection to {self.address}: {exc}")
            self.close()

    # --- frames ----------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, id: int, payload: bytes) -> None:
        if id == 0:
            if kind == SETTINGS and not flags & ACK:
                self._settings(payload)
            elif kind == PING and not flags & ACK:
                self._write(encode_frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE:
                self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                self.window_opened.set()
            elif kind == GOAWAY:
                self.usable = False
                last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                for stream_id, stream in list(self.streams.items()):
                    if stream_id > last:
                        stream.finish(RpcError("UNAVAILABLE", "the shim is going away"))
                        del self.streams[stream_id]
            return
        stream = self.streams.get(id)
        if kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                payload = unpad(flags, payload, priority=True)
            self._header_block(stream or self.orphan, kind, flags, payload)
        elif stream is None:
            return  # a stream we gave up on (cancelled, timed out)
        elif kind == DATA:
            self._data(stream, flags, unpad(flags, payload))
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            name = "CANCELLED" if code == CANCEL_ERROR else "INTERNAL"
            self._end(stream, RpcError(name, f"stream reset by the shim (HTTP/2 error {code})"))
        elif kind == WINDOW_UPDATE:
            stream.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self.window_opened.set()

    def _settings(self, payload: bytes) -> None:
        for key, value in settings(payload):
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.stream_window_initial
                self.stream_window_initial = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.max_send_frame = value
        self._write(encode_frame(SETTINGS, ACK, 0))
        self.window_opened.set()

    def _header_block(self, stream: _Stream, kind: int, flags: int, fragment: bytes) -> None:
        """Every header block is decoded, even a dropped stream's: HPACK state is shared."""
        if kind == HEADERS:
            stream.block_ends = bool(flags & END_STREAM)
            stream.block.clear()
        stream.block += fragment
        if not flags & END_HEADERS:
            return
        headers = dict(self.decoder.decode(bytes(stream.block)))
        ends = stream.block_ends
        stream.block.clear()
        stream.block_ends = False
        if stream.id == 0:
            return
        if "grpc-status" in headers:  # trailers, or a trailers-only answer
            self._end(stream, _status(headers))
        elif not stream.headers_seen:
            stream.headers_seen = True
            status = headers.get(":status", "200")
            if status != "200":
                self._end(stream, RpcError(HTTP_CODES.get(int(status), "INTERNAL") if status.isdigit()
                                           else "INTERNAL", f"HTTP status {status} from the shim"))
                return
            if ends:
                self._end(stream, RpcError("INTERNAL", "the shim answered without a status"))
        elif ends:
            self._end(stream, RpcError("INTERNAL", "the shim's trailers have no grpc-status"))

    def _data(self, stream: _Stream, flags: int, payload: bytes) -> None:
        stream.buffer += payload
        self._acknowledge(stream, len(payload))
        buffer = stream.buffer
        while len(buffer) >= 5:
            if buffer[0]:
                self._end(stream, RpcError("UNIMPLEMENTED", "a compressed message"), reset=True)
                return
            size = int.from_bytes(buffer[1:5], "big")
            if size > MAX_MESSAGE:
                self._end(stream, RpcError("RESOURCE_EXHAUSTED", f"a message of {size} bytes"),
                          reset=True)
                return
            if len(buffer) < 5 + size:
                break
            stream.messages.append(bytes(buffer[5:5 + size]))
            del buffer[:5 + size]
            stream.changed.set()
        if flags & END_STREAM:
            self._end(stream, RpcError("INTERNAL", "the shim ended the call without a status"))

    def _acknowledge(self, stream: _Stream, size: int) -> None:
        """Give back receive window once half of it is used (we opened it fully)."""
        self.received += size
        if self.received > MAX_WINDOW // 2:
            increment, self.received = self.received, 0
            self._write(encode_frame(WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))
        stream.unacknowledged += size
        if stream.unacknowledged > MAX_WINDOW // 2:
            increment, stream.unacknowledged = stream.unacknowledged, 0
            self._write(encode_frame(WINDOW_UPDATE, 0, stream.id, increment.to_bytes(4, "big")))

    def _end(self, stream: _Stream, error: RpcError | None, reset: bool = False) -> None:
        self.streams.pop(stream.id, None)
        if reset:
            self._write(encode_frame(RST_STREAM, 0, stream.id, CANCEL_ERROR.to_bytes(4, "big")))
        stream.finish(None if error is not None and error.code == "OK" else error)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- calls -----------------------------------------------------------------------

    async def start(self, path: str, body: bytes, timeout: float | None) -> _Stream:
        if not self.usable or self.transport is None or self.transport.is_closing():
            raise self.lost
        stream = _Stream(self.next_stream, self.stream_window_initial)
        self.next_stream += 2
        if self.next_stream >= 1 << 30:
            self.usable = False  # out of stream ids: the next call dials anew
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", "localhost"), ("content-type", "application/grpc"),
                   ("te", "trailers")]
        if timeout is not None:
            headers.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        self.streams[stream.id] = stream
        message = len(body).to_bytes(5, "big") + body  # flag 0 (not compressed), length
        if len(message) <= min(self.send_window, stream.send_window, self.max_send_frame):
            self.send_window -= len(message)
            stream.send_window -= len(message)
            self._write(encode_frame(HEADERS, END_HEADERS, stream.id, encode_headers(headers))
                        + encode_frame(DATA, END_STREAM, stream.id, message))
            return stream
        self._write(encode_frame(HEADERS, END_HEADERS, stream.id, encode_headers(headers)))
        view = memoryview(message)
        while view:
            while min(self.send_window, stream.send_window) <= 0:
                if stream.done or not self.usable:
                    raise stream.error or self.lost
                self.window_opened.clear()
                await self.window_opened.wait()
            size = min(len(view), self.send_window, stream.send_window, self.max_send_frame)
            self.send_window -= size
            stream.send_window -= size
            chunk, view = view[:size], view[size:]
            self._write(encode_frame(DATA, 0 if view else END_STREAM, stream.id, bytes(chunk)))
        return stream

    def cancel(self, stream: _Stream, error: RpcError | None = None) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self._write(encode_frame(RST_STREAM, 0, stream.id, CANCEL_ERROR.to_bytes(4, "big")))
        stream.finish(error or RpcError("CANCELLED", "call cancelled"))

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()


class Channel:
    """Calls to one shim (`unix:///path` or a path) over one HTTP/2 connection, dialled on
    first use and again after it was lost or closed for idleness: once no call has been
    in flight for `idle_close` seconds (None: never)."""

    def __init__(self, address: str):
        self.address = address
        self.path = address.removeprefix("unix://")
        self.idle_close: float | None = IDLE_CLOSE
        self._connection: _Connection | None = None
        self._dialling: asyncio.Future | None = None
        self._closed = False
        self._calls = 0  # in flight, from before they have a connection until they end
        self._last_call = 0.0  # loop time the last call ended
        self._idle_timer: asyncio.TimerHandle | None = None

    async def _connect(self) -> _Connection:
        connection = self._connection
        if connection is not None and connection.usable:
            return connection
        if self._closed:
            raise RpcError("UNAVAILABLE", f"channel to {self.address} closed")
        if self._dialling is None:
            self._dialling = asyncio.ensure_future(self._dial())
        dialling = self._dialling
        try:
            return await asyncio.shield(dialling)
        finally:
            if self._dialling is dialling and dialling.done():
                self._dialling = None

    async def _dial(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_unix_connection(
                lambda: _Connection(self.address), self.path)
        except OSError as exc:
            raise RpcError("UNAVAILABLE", f"failed to connect to {self.address}: "
                            f"{exc.strerror or exc}") from None
        if self._closed:
            connection.close()
            raise RpcError("UNAVAILABLE", f"channel to {self.address} closed")
        if self._connection is not None:
            self._connection.close()
        self._connection = connection
        return connection

    def _call_started(self) -> None:
        self._calls += 1

    def _call_ended(self) -> None:
        """Arms the idle check when the last call in flight ends (one timer per channel)."""
        self._calls -= 1
        if self._calls or self.idle_close is None:
            return
        loop = asyncio.get_running_loop()
        self._last_call = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_later(self.idle_close, self._idle_check)

    def _idle_check(self) -> None:
        """Close the connection if no call was in flight since `idle_close` ago; calls count
        from before they ask for a connection, so none can start on one being closed."""
        self._idle_timer = None
        connection = self._connection
        if self._calls or self.idle_close is None or connection is None or not connection.usable:
            return
        loop = asyncio.get_running_loop()
        left = self._last_call + self.idle_close - loop.time()
        if left > 0:  # calls came and went meanwhile
            self._idle_timer = loop.call_later(left, self._idle_check)
            return
        connection.lost = RpcError("UNAVAILABLE", f"connection to {self.address} closed idle")
        connection.close()

    async def unary(self, path: str, body: bytes, timeout: float | None = None) -> bytes:
        self._call_started()
        try:
            stream = await self._unary(path, body, timeout)
        finally:
            self._call_ended()
        if stream.error is not None:
            raise stream.error
        if len(stream.messages) != 1:
            raise RpcError("INTERNAL", f"{path}: {len(stream.messages)} messages to a unary call")
        return stream.messages[0]

    async def _unary(self, path: str, body: bytes, timeout: float | None) -> _Stream:
        connection = await self._connect()
        stream = await connection.start(path, body, timeout)
        # a timer, not asyncio.timeout: the daemon's server may run a handler outside a Task
        expiry = None if timeout is None else asyncio.get_running_loop().call_later(
            timeout, connection.cancel, stream,
            RpcError("DEADLINE_EXCEEDED", f"{path}: no answer in {timeout} s"))
        try:
            while not stream.done:
                stream.changed.clear()
                await stream.changed.wait()
        except BaseException:
            connection.cancel(stream)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        return stream

    async def stream(self, path: str, body: bytes):
        """The response messages of a server-streaming call, as they come."""
        self._call_started()
        try:
            connection = await self._connect()
            stream = await connection.start(path, body, None)
            try:
                while True:
                    while stream.messages:
                        yield stream.messages.popleft()
                    if stream.done:
                        break
                    stream.changed.clear()
                    await stream.changed.wait()
            finally:
                if not stream.done:
                    connection.cancel(stream)
        finally:
            self._call_ended()
        if stream.error is not None:
            raise stream.error

    async def close(self) -> None:
        """Close the connection; calls on it fail with UNAVAILABLE."""
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._dialling is not None and not self._dialling.done():
            self._dialling.cancel()
            with contextlib.suppress(BaseException):
                await self._dialling
        if self._connection is not None:
            self._connection.lost = RpcError("UNAVAILABLE", f"channel to {self.address} closed")
            self._connection.close()
            for stream in list(self._connection.streams.values()):
                stream.finish(self._connection.lost)
            self._connection.streams.clear()


def _status(headers: dict[str, str]) -> RpcError:
    code = status_name(headers.get("grpc-status"))
    return RpcError(code, percent_decode(headers.get("grpc-message", "")) or code)
