"""gRPC over HTTP/2 on a unix socket, with the standard library alone.

Why not grpcio: `import grpc` costs 60-90 ms of CPU (its C core, and asyncio with it) at
every start of `ctl`, more than everything else a `ctl ps` does. The client half of gRPC
that the library needs is small: HTTP/2 framing and flow control (RFC 9113), HPACK header
decoding (RFC 7541) and gRPC's 5-byte message prefix and trailers (gRPC's PROTOCOL-HTTP2).
This module speaks exactly that: no TLS, no compression, no name resolution, no retries.

A `Channel` keeps a pool of HTTP/2 connections. A call takes an idle one (or dials a new
one) for its whole duration and gives it back when it ends cleanly, so calls from several
threads never share a connection and no reader thread is needed: the thread that iterates a
call reads its frames. A client-streaming call sends from a thread of its own.
"""

from __future__ import annotations

# _socket, not socket: socket.py's enum tables and its selectors import cost ~4 ms at every
# ctl start, and its wrapper class adds nothing this client uses
import _socket
import os
import select
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator

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
    PUSH_PROMISE,
    RECEIVE_FRAME_SIZE,
    REFUSED_STREAM,
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


class _Unsent(Exception):
    """A reused connection failed before any of the request was sent."""


class _Closed(Exception):
    """The connection ended (EOF, reset, or shut down by `cancel`)."""


# connections --------------------------------------------------------------------------------

class _Connection:
    """One HTTP/2 connection, used by one call at a time."""

    def __init__(self, address: str):
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self.sock.connect(address)
        except OSError:
            self.sock.close()
            raise
        self.buffer = bytearray()
        self.decoder = HeaderDecoder()
        self.next_stream = 1
        self.usable = True
        self.lock = threading.Condition()  # guards writes and the send windows
        self.send_window = DEFAULT_WINDOW
        self.stream_window_initial = DEFAULT_WINDOW
        self.max_send_frame = 16384
        self.received = 0  # bytes since our last connection WINDOW_UPDATE
        self.goaway_last: int | None = None
        self.call: _Call | None = None
        settings = encode_settings(
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, RECEIVE_FRAME_SIZE),
        )
        self.sock.sendall(PREFACE + encode_frame(SETTINGS, 0, 0, settings)
                          + encode_frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def close(self) -> None:
        self.usable = False
        try:
            self.sock.close()
        except OSError:
            pass

    def read_frame(self) -> tuple[int, int, int, bytes]:
        buffer = self.buffer
        while len(buffer) < 9:
            self._fill()
        length = int.from_bytes(buffer[:3], "big")
        while len(buffer) < 9 + length:
            self._fill()
        kind, flags = buffer[3], buffer[4]
        stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        payload = bytes(buffer[9:9 + length])
        del buffer[:9 + length]
        return kind, flags, stream, payload

    def _fill(self) -> None:
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            raise
        except OSError as exc:
            raise _Closed(str(exc)) from None
        if not data:
            raise _Closed("connection closed by the daemon")
        self.buffer += data

    def handle(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        """A frame: connection-level ones here, the current call's to the call."""
        if stream == 0:
            if kind == SETTINGS and not flags & ACK:
                self._settings(payload)
            elif kind == PING and not flags & ACK:
                self.send(encode_frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE:
                with self.lock:
                    self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                    self.lock.notify_all()
            elif kind == GOAWAY:
                self.usable = False
                self.goaway_last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if self.call is not None and self.call.stream > self.goaway_last:
                    self.call.fail(RpcError("UNAVAILABLE", "the daemon is going away"))
            return
        if kind in (HEADERS, CONTINUATION, PUSH_PROMISE) and (self.call is None or stream != self.call.stream):
            self.usable = False  # a stray header block we cannot place: keep HPACK safe, drop it later
            return
        if self.call is not None and stream == self.call.stream:
            self.call.frame(kind, flags, payload)

    def _settings(self, payload: bytes) -> None:
        with self.lock:
            for key, value in settings(payload):
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    delta = value - self.stream_window_initial
                    self.stream_window_initial = value
                    if self.call is not None:
                        self.call.send_window += delta
                elif key == SETTINGS_MAX_FRAME_SIZE:
                    self.max_send_frame = value
            self.sock.sendall(encode_frame(SETTINGS, ACK, 0))
            self.lock.notify_all()

    def acknowledge(self, size: int) -> None:
        """Give back receive window once half of it is used (we opened it fully)."""
        self.received += size
        if self.received > MAX_WINDOW // 2:
            increment, self.received = self.received, 0
            self.send(encode_frame(WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))

    def idle_ok(self) -> bool:
        """Whether a pooled connection can carry a call: handles what arrived while it was
        idle (settings, pings, a GOAWAY) and notices a daemon that went away."""
        if not self.usable:
            return False
        buffer = self.buffer
        try:
            while select.select([self.sock], [], [], 0)[0]:
                self._fill()
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                self.handle(*self.read_frame())
        except (_Closed, OSError, RpcError):
            return False
        return self.usable


class Channel:
    """Calls to one unix socket address over pooled HTTP/2 connections."""

    def __init__(self, address: str, max_message_size: int = 16 << 20):
        self.address = address
        self.max_message_size = max_message_size
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        _channels.add(self)

    def _forget_idle(self) -> None:
        """In a forked child: the pooled connections are the parent's (their HTTP/2 state
        is shared with it), so the child closes its copies and dials its own."""
        self._lock = threading.Lock()
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _take(self) -> _Connection:
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                break
            if connection.idle_ok():
                return connection
            connection.close()
        return self._dial()

    def _dial(self) -> _Connection:
        try:
            return _Connection(self.address)
        except OSError as exc:
            raise RpcError("UNAVAILABLE", f"failed to connect to {self.address}: {exc.strerror or exc}") from None

    def _give_back(self, connection: _Connection) -> None:
        with self._lock:
            if connection.usable and not self._closed and connection.next_stream < (1 << 30):
                self._idle.append(connection)
                return
        connection.close()

    def call(self, path: str, request: bytes | Iterable[bytes], metadata: list[tuple[str, str]],
             timeout: float | None = None) -> _Call:
        """Start a call; iterate the result for the response messages (raw bytes)."""
        try:
            return _Call(self, self._take(), path, request, metadata, timeout)
        except _Unsent:  # a pooled connection died under us before the request left: redial
            return _Call(self, self._dial(), path, request, metadata, timeout)

    def unary(self, path: str, request: bytes, metadata: list[tuple[str, str]],
              timeout: float | None = None) -> bytes:
        messages = list(self.call(path, request, metadata, timeout))
        if len(messages) != 1:
            raise RpcError("INTERNAL", f"{path}: {len(messages)} response messages to a unary call")
        return messages[0]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


_channels: weakref.WeakSet[Channel] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for channel in list(_channels):
        channel._forget_idle()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Call:
    """One stream: sends the request (from a thread when it is an iterable of messages),
    yields the response messages, raises RpcError for a non-OK status."""

    def __init__(self, channel: Channel, connection: _Connection, path: str,
                 request: bytes | Iterable[bytes], metadata: list[tuple[str, str]],
                 timeout: float | None):
        import time

        self.channel = channel
        self.connection = connection
        self.stream = connection.next_stream
        connection.next_stream += 2
        connection.call = self
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.send_window = connection.stream_window_initial
        self.received = 0  # bytes since our last WINDOW_UPDATE for this stream
        self.events: deque = deque()  # ("message", bytes) | ("status", RpcError | None)
        self.data = bytearray()
        self.header_block = bytearray()
        self.header_flags = 0
        self.http_status = ""
        self.headers_seen = False
        self.finished = False  # the server ended the stream (or the call failed)
        self.cancelled = False
        self.error: BaseException | None = None
        self.sender: threading.Thread | None = None
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
                   ("content-type", "application/grpc"), ("te", "trailers")]
        if timeout is not None:
            headers.append(("grpc-timeout", f"{max(int(timeout * 1000), 1)}m"))
        headers += metadata
        try:
            connection.send(encode_frame(HEADERS, END_HEADERS, self.stream, encode_headers(headers)))
        except OSError as exc:
            connection.close()
            if self.stream > 1:
                raise _Unsent from None
            raise RpcError("UNAVAILABLE", f"connection to {channel.address} lost: {exc}") from None
        try:
            if isinstance(request, bytes | bytearray):
                self._send_message(request, end=True)
            else:
                self.sender = threading.Thread(target=self._send_all, args=(iter(request),),
                                               name="grpc-send", daemon=True)
                self.sender.start()
        except (OSError, _Closed) as exc:
            connection.close()
            raise RpcError("UNAVAILABLE", f"connection to {channel.address} lost: {exc}") from None
        except BaseException:
            connection.close()
            raise

    # sending ------------------------------------------------------------------------------

    def _send_message(self, message: bytes, end: bool) -> None:
        data = memoryview(b"\x00" + len(message).to_bytes(4, "big") + message)
        connection = self.connection
        threaded = self.sender is not None
        while True:
            with connection.lock:
                while not threaded and min(connection.send_window, self.send_window) <= 0 and len(data):
                    if self.finished:  # the daemon answered (an error) before reading it all
                        return
                    connection.lock.release()  # read frames until the daemon opens a window
                    try:
                        self._pump()
                    finally:
                        connection.lock.acquire()
                while threaded and min(connection.send_window, self.send_window) <= 0 and len(data):
                    if self.finished or self.cancelled:
                        return
                    connection.lock.wait(1.0)
                size = min(len(data), connection.send_window, self.send_window, connection.max_send_frame)
                chunk, data = data[:size], data[size:]
                connection.send_window -= size
                self.send_window -= size
                last = end and not len(data)
                connection.sock.sendall(encode_frame(DATA, END_STREAM if last else 0, self.stream, bytes(chunk)))
            if not len(data):
                return

    def _send_all(self, requests: Iterator[bytes]) -> None:
        try:
            for message in requests:
                if self.finished or self.cancelled:
                    return
                self._send_message(message, end=False)
            if not (self.finished or self.cancelled):
                self.connection.send(encode_frame(DATA, END_STREAM, self.stream))
        except BaseException as exc:  # noqa: BLE001 - the request iterator failed: the call fails
            self.error = exc
            self.connection.usable = False
            try:
                self.connection.send(encode_frame(RST_STREAM, 0, self.stream, CANCEL_ERROR.to_bytes(4, "big")))
                self.connection.sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    # receiving ----------------------------------------------------------------------------

    def _pump(self) -> None:
        import time

        connection = self.connection
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            connection.sock.settimeout(remaining)
        elif connection.sock.gettimeout() is not None:
            connection.sock.settimeout(None)
        connection.handle(*connection.read_frame())

    def frame(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == DATA:
            size = len(payload)  # flow control counts the padding too
            payload = unpad(flags, payload)
            self.connection.acknowledge(size)
            self.received += size
            if self.received > MAX_WINDOW // 2 and not flags & END_STREAM:
                increment, self.received = self.received, 0
                self.connection.send(encode_frame(WINDOW_UPDATE, 0, self.stream, increment.to_bytes(4, "big")))
            self.data += payload
            self._messages()
            if flags & END_STREAM:
                self._end({})
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                self.header_block = bytearray(unpad(flags, payload, priority=True))
                self.header_flags = flags
            else:
                self.header_block += payload
            if flags & END_HEADERS:
                headers = dict(self.connection.decoder.decode(bytes(self.header_block)))
                if not self.headers_seen:
                    self.headers_seen = True
                    self.http_status = headers.get(":status", "")
                if self.header_flags & END_STREAM:
                    self._end(headers)
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            self.connection.usable = False
            name = {CANCEL_ERROR: "CANCELLED", REFUSED_STREAM: "UNAVAILABLE"}.get(code, "INTERNAL")
            self.fail(RpcError(name, f"stream reset by the daemon (HTTP/2 error {code})"))
        elif kind == WINDOW_UPDATE:
            with self.connection.lock:
                self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                self.connection.lock.notify_all()

    def _messages(self) -> None:
        data = self.data
        while len(data) >= 5:
            length = int.from_bytes(data[1:5], "big")
            if data[0]:
                raise RpcError("INTERNAL", "compressed message, but no compression was offered")
            if length > self.channel.max_message_size:
                self.connection.usable = False
                raise RpcError("RESOURCE_EXHAUSTED",
                               f"response message larger than {self.channel.max_message_size} bytes")
            if len(data) < 5 + length:
                return
            self.events.append(("message", bytes(data[5:5 + length])))
            del data[:5 + length]

    def _end(self, trailers: dict) -> None:
        status = trailers.get("grpc-status") if trailers else None
        if status is None:
            code = 200
            try:
                code = int(self.http_status or 0)
            except ValueError:
                pass
            name = HTTP_CODES.get(code, "UNKNOWN") if code != 200 else "INTERNAL"
            error: RpcError | None = RpcError(name, f"stream ended without a gRPC status (HTTP {code})")
        else:
            name = status_name(status)
            message = percent_decode(trailers.get("grpc-message", ""))
            error = None if name == "OK" else RpcError(name, message)
        if self.data and error is None:
            error = RpcError("INTERNAL", "stream ended inside a message")
        self.finished = True
        self.events.append(("status", error))

    def fail(self, error: RpcError) -> None:
        self.finished = True
        self.events.append(("status", error))

    def __iter__(self) -> Iterator[bytes]:
        connection = self.connection
        clean = False
        try:
            while True:
                while self.events:
                    kind, value = self.events.popleft()
                    if kind == "message":
                        yield value
                        continue
                    if self.sender is not None:
                        self.sender.join(0.1)
                    clean = self.sender is None or not self.sender.is_alive()
                    if value is not None:
                        raise value
                    return
                if self.error is not None:
                    raise self.error
                try:
                    self._pump()
                except TimeoutError:
                    raise RpcError("DEADLINE_EXCEEDED", "deadline exceeded") from None
                except _Closed as exc:
                    if self.cancelled:
                        raise RpcError("CANCELLED", "cancelled") from None
                    if self.error is not None:
                        raise self.error from None
                    raise RpcError("UNAVAILABLE", f"connection to {self.channel.address} lost: {exc}") from None
        finally:
            self.finished = True
            connection.call = None
            if clean and not self.cancelled:
                self.channel._give_back(connection)
            else:
                if not self.cancelled:
                    try:
                        connection.send(encode_frame(RST_STREAM, 0, self.stream, CANCEL_ERROR.to_bytes(4, "big")))
                    except OSError:
                        pass
                connection.close()

    def abandon(self) -> None:
        """Give up on a call nobody reads (or will): the stream is reset and the connection
        closed, with no frame read. A call read to its end already is left as it is (its
        connection may be back in the pool)."""
        if self.finished:
            return
        self.cancel()
        self.finished = True
        self.connection.call = None
        self.connection.close()

    def cancel(self) -> None:
        """End the call from any thread: the iterating thread sees CANCELLED."""
        if self.finished:
            return
        self.cancelled = True
        connection = self.connection
        try:
            connection.send(encode_frame(RST_STREAM, 0, self.stream, CANCEL_ERROR.to_bytes(4, "big")))
        except OSError:
            pass
        try:
            connection.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        with connection.lock:
            connection.lock.notify_all()

