"""Request bodies whose big `bytes` field is taken as a view instead of being copied.

The generated parser copies a `bytes` field into its arena and every read of the field
copies it again: three passes over each MiB a client streams into Content.Write or
Archives.Import, and fresh pages to fault in for each (docs/content.md). These helpers
cut the field out of the wire bytes; the services parse the rest with the generated
parser, so every other field keeps its exact behaviour.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint too long")


def split_bytes_field(raw: bytes, field: int) -> tuple[bytes, memoryview] | None:
    """(the body without the field, the field's value as a view into `raw`) when `raw`
    holds exactly one top-level length-delimited field number `field`; None when there is
    none, more than one, or the body is not plain wire format."""
    try:
        span = _field_span(raw, (field << 3) | 2)
    except (IndexError, ValueError):
        return None
    if span is None:
        return None
    start, value_start, end = span
    rest = raw[end:] if start == 0 else raw[:start] + raw[end:]
    return rest, memoryview(raw)[value_start:end]


def _field_span(raw: bytes, wanted: int) -> tuple[int, int, int] | None:
    span = None
    pos, end = 0, len(raw)
    while pos < end:
        start = pos
        key, pos = _varint(raw, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(raw, pos)
        elif wire == 2:
            length, pos = _varint(raw, pos)
            if key == wanted:
                if span is not None:
                    return None
                span = (start, pos, pos + length)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            return None
    return span if pos == end else None


def serve_stream_with_parser(table, service: str, method: str, behaviour: Callable,
                             parse: Callable[[bytes], object], response_type) -> None:
    """Serve a stream-stream `method` with `parse` as its request deserializer, in place
    of the generated handler the service's registration put in the daemon's MethodTable."""
    handler = grpc.stream_stream_rpc_method_handler(
        behaviour, request_deserializer=parse,
        response_serializer=response_type.SerializeToString)
    table.add_registered_method_handlers(service, {method: handler})
