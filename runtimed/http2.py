"""gRPC's wire below the messages: HTTP/2 frames (RFC 9113), HPACK (RFC 7541), status codes.

Shared by every gRPC peer of ours: the daemon's server (runtimed/services/h2server.py), its
shim client (runtimed/runtime/h2client.py) and ctl's client (ctl/client/wire.py). Standard
library only, and cheap to import: ctl loads it at every start.
"""

from __future__ import annotations

import functools
from collections import deque

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH = 1, 2
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
RECEIVE_FRAME_SIZE = 1 << 20  # the max frame size each of our peers advertises
# error codes of RST_STREAM and GOAWAY
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, CANCEL_ERROR, COMPRESSION_ERROR = 0x7, 0x8, 0x9

CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
         "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
         "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
         "UNAUTHENTICATED")
# gRPC's mapping of an HTTP status without grpc-status (doc/http-grpc-status-mapping.md)
HTTP_CODES = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "UNIMPLEMENTED", 429: "UNAVAILABLE", 502: "UNAVAILABLE",
              503: "UNAVAILABLE", 504: "UNAVAILABLE"}


class RpcError(Exception):
    """A call's non-OK status: `code` is the status code's name (`NOT_FOUND`)."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


# HPACK ------------------------------------------------------------------------------------

_STATIC_NAMES = (
    ":authority :method :method :path :path :scheme :scheme :status :status :status :status "
    ":status :status :status accept-charset accept-encoding accept-language accept-ranges "
    "accept access-control-allow-origin age allow authorization cache-control "
    "content-disposition content-encoding content-language content-length content-location "
    "content-range content-type cookie date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified link location "
    "max-forwards proxy-authenticate proxy-authorization range referer refresh retry-after "
    "server set-cookie strict-transport-security transfer-encoding user-agent vary via "
    "www-authenticate").split()
_STATIC_VALUES = {2: "GET", 3: "POST", 4: "/", 5: "/index.html", 6: "http", 7: "https", 8: "200",
                  9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500",
                  16: "gzip, deflate"}
STATIC_TABLE = [("", "")] + [(n, _STATIC_VALUES.get(i, "")) for i, n in enumerate(_STATIC_NAMES, 1)]

# RFC 7541 Appendix B is a canonical Huffman code: the code length of each of the 257
# symbols (EOS last) determines every code.
_HUFFMAN_LENGTHS = bytes.fromhex(
    "0d171c1c1c1c1c1c1c181e1c1c1e1c1c1c1c1c1c1c1c1e1c1c1c1c1c1c1c1c1c060a0a0c0d06080b0a0a080b"
    "080606060505050606060606060607080f060c0a0d06070707070707070707070707070707070707070707070807"
    "080d130d0e060f05060506050606060507070606060506070605050607070707070f0b0e0d1c1416141416161617"
    "16171717171718171818161718171717171516171617171816151416161717151716161815161717151516151716"
    "171714161616171616171a1a1413161716191a1a1a1b1b1a181913151a1b1b1a1b1815151a1a1c1b1b1b14181415"
    "161515171616191918181a171a1b1a1a1b1b1b1b1b1c1b1b1b1b1b1a1e")
_huffman_codes: dict[tuple[int, int], int] = {}


def _huffman_decode(data: bytes) -> bytes:
    codes = _huffman_codes
    if not codes:
        code, previous = -1, 0
        for symbol in sorted(range(257), key=lambda s: (_HUFFMAN_LENGTHS[s], s)):
            length = _HUFFMAN_LENGTHS[symbol]
            code = (code + 1) << (length - previous)
            previous = length
            codes[(length, code)] = symbol
    out = bytearray()
    code = bits = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            bits += 1
            if bits >= 5:
                symbol = codes.get((bits, code))
                if symbol is not None:
                    if symbol == 256:
                        raise RpcError("INTERNAL", "HPACK: EOS in a Huffman string")
                    out.append(symbol)
                    code = bits = 0
    if bits > 7 or code != (1 << bits) - 1:
        raise RpcError("INTERNAL", "HPACK: bad Huffman padding")
    return bytes(out)


def _int(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _string(block: bytes, i: int) -> tuple[str, int]:
    huffman = block[i] & 0x80
    length, i = _int(block, i, 7)
    raw = block[i:i + length]
    if len(raw) != length:
        raise RpcError("INTERNAL", "HPACK: truncated string")
    return (_huffman_decode(raw) if huffman else raw).decode("latin-1"), i + length


# Header blocks that neither read nor change a connection's dynamic table (our own
# clients' and servers' literals: the same few blocks, call after call) decode to the same
# headers anywhere, so each is decoded once; the daemon spent ~12% of its event loop's
# time decoding them.
_PURE_BLOCKS: dict[bytes, tuple[tuple[str, str], ...]] = {}
_PURE_BLOCKS_MAX = 1024


class HeaderDecoder:
    """HPACK decoding with the connection's dynamic table (strings kept as latin-1, so a
    string's length is its size in octets)."""

    def __init__(self, max_size: int = 4096):
        self.table: deque[tuple[str, str]] = deque()
        self.size = 0
        self.max_size = self.limit = max_size

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        known = _PURE_BLOCKS.get(block)
        if known is not None:
            return list(known)
        headers = []
        pure = True  # nothing read from or added to the dynamic table
        static = len(STATIC_TABLE)
        i = 0
        try:
            while i < len(block):
                byte = block[i]
                if byte & 0x80:  # indexed
                    index, i = _int(block, i, 7)
                    pure = pure and index < static
                    headers.append(self._entry(index))
                elif byte & 0x40:  # literal, added to the table
                    name, value, i = self._literal(block, i, 6)
                    self._add(name, value)
                    pure = False
                    headers.append((name, value))
                elif byte & 0x20:  # dynamic table size update
                    size, i = _int(block, i, 5)
                    if size > self.limit:
                        raise RpcError("INTERNAL", "HPACK: table size above our limit")
                    self.max_size = size
                    self._evict()
                    pure = False
                else:  # literal without indexing, or never indexed
                    pure = pure and _int(block, i, 4)[0] < static
                    name, value, i = self._literal(block, i, 4)
                    headers.append((name, value))
        except IndexError:
            raise RpcError("INTERNAL", "HPACK: truncated header block") from None
        if pure:
            if len(_PURE_BLOCKS) >= _PURE_BLOCKS_MAX:
                _PURE_BLOCKS.clear()
            _PURE_BLOCKS[bytes(block)] = tuple(headers)
        return headers

    def _literal(self, block: bytes, i: int, prefix: int) -> tuple[str, str, int]:
        index, i = _int(block, i, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, i = _string(block, i)
        value, i = _string(block, i)
        return name, value, i

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index < len(STATIC_TABLE):
            return STATIC_TABLE[index]
        dynamic = index - len(STATIC_TABLE)
        if index <= 0 or dynamic >= len(self.table):
            raise RpcError("INTERNAL", f"HPACK: no table entry {index}")
        return self.table[dynamic]

    def _add(self, name: str, value: str) -> None:
        self.table.appendleft((name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32


def _encode_int(value: int, prefix: int, first: int = 0) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_str(text: str) -> bytes:
    raw = text.encode("latin-1")
    return _encode_int(len(raw), 7) + raw


def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    """Literals without indexing (no table state to keep), names from the static table
    where it has them. A call's headers repeat call after call: each list is encoded once."""
    return _encode_block(tuple(headers))


@functools.lru_cache(maxsize=1024)
def _encode_block(headers: tuple[tuple[str, str], ...]) -> bytes:
    out = bytearray()
    for name, value in headers:
        try:
            index = _STATIC_NAMES.index(name) + 1
            out += _encode_int(index, 4) + _encode_str(value)
        except ValueError:
            out += b"\x00" + _encode_str(name) + _encode_str(value)
    return bytes(out)


def percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    raw = text.encode("latin-1")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and i + 3 <= len(raw):
            try:
                out.append(int(raw[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", errors="replace")


def status_name(value: str | None) -> str:
    """The status code name a grpc-status value stands for (UNKNOWN if it is none)."""
    try:
        return CODES[int(value)]
    except (TypeError, ValueError, IndexError):
        return "UNKNOWN"


class ProtocolError(RpcError):
    """The peer broke HTTP/2's framing: the connection cannot go on."""

    def __init__(self, details: str):
        super().__init__("INTERNAL", f"HTTP/2: {details}")


def unpad(flags: int, payload, priority: bool = False):
    """A DATA or HEADERS payload without its padding (and, for HEADERS, `priority`, without
    its priority fields). Flow control counts what it strips: take the size before."""
    if flags & PADDED:
        if not payload or payload[0] >= len(payload):
            raise ProtocolError("bad padding")
        payload = payload[1:len(payload) - payload[0]]
    if priority and flags & PRIORITY_FLAG:
        payload = payload[5:]
    return payload


def settings(payload: bytes) -> list[tuple[int, int]]:
    """A SETTINGS frame's (identifier, value) pairs."""
    return [(int.from_bytes(payload[i:i + 2], "big"), int.from_bytes(payload[i + 2:i + 6], "big"))
            for i in range(0, len(payload) - 5, 6)]


def encode_settings(*pairs: tuple[int, int]) -> bytes:
    """A SETTINGS frame's payload from (identifier, value) pairs."""
    return b"".join(key.to_bytes(2, "big") + value.to_bytes(4, "big") for key, value in pairs)


def encode_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
