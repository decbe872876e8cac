"""Container logs in the CRI log format, as the shim writes them for a `file://...?format=cri`
stdout URI (see shimd/stdio.py) and ctl's own copy of a foreground run does.

One record per line: `<RFC3339Nano UTC> <stdout|stderr> <F|P> <data>`; `P` records are
parts of a line whose rest follows (no newline after them). The fixed-width UTC
timestamps compare as strings, so `--since` needs no date parsing per line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from runtimed.errors import InvalidArgument

CRI_SUFFIX = "?format=cri"


def uri(path: str) -> str:
    return "file://" + path + CRI_SUFFIX


def timestamp(ns: int) -> bytes:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % nanos


def encode(data: bytes, stream: str, now_ns: int | None = None) -> bytes:
    """One chunk of output as records with one timestamp (what the shim writes)."""
    prefix = timestamp(time.time_ns() if now_ns is None else now_ns) + b" " + stream.encode()
    lines = data.split(b"\n")
    last = lines.pop()
    out = b"".join(prefix + b" F " + line + b"\n" for line in lines)
    if last:
        out += prefix + b" P " + last + b"\n"
    return out


@dataclass
class Line:
    """A logical line: its first record's timestamp, its stream and its bytes (with the
    newline, unless the output ended without one)."""

    timestamp: bytes
    stream: str
    data: bytes


class Decoder:
    """Records in, complete lines out; a partial record at the end waits for more bytes."""

    def __init__(self) -> None:
        self._rest = b""
        self._open: dict[str, Line] = {}

    def feed(self, data: bytes) -> Iterator[Line]:
        data = self._rest + data
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        for record in data[:end].split(b"\n")[:-1]:
            parts = record.split(b" ", 3)
            if len(parts) < 3:
                continue
            ts, stream, tag = parts[0], parts[1].decode(errors="replace"), parts[2]
            chunk = parts[3] if len(parts) == 4 else b""
            line = self._open.pop(stream, None)
            if line is None:
                line = Line(ts, stream, b"")
            line.data += chunk
            if tag == b"P":
                self._open[stream] = line
            else:
                line.data += b"\n"
                yield line

    def flush(self) -> Iterator[Line]:
        """Parts never completed (the process ended without a newline)."""
        lines = sorted(self._open.values(), key=lambda line: line.timestamp)
        self._open.clear()
        yield from lines


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def since(value: str, now: float | None = None) -> bytes:
    """docker's `--since`: an RFC 3339 time, a Unix time, or a duration ago (`10m`,
    `1h30m`); as the timestamp string records compare against."""
    now = time.time() if now is None else now
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timestamp(int(float(text) * 1e9))
    if _DURATION.fullmatch(text) or re.fullmatch(rf"(?:{_DURATION.pattern})+", text):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
        return timestamp(int((now - seconds) * 1e9))
    # the fraction is kept as integer nanoseconds: through a float, a record's own stamp
    # (as `logs -t` prints it) could come back up to 256 ns later and miss that record
    fraction = re.search(r"\.(\d+)", text)
    whole = text[:fraction.start()] + text[fraction.end():] if fraction else text
    try:
        parsed = datetime.fromisoformat(whole.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f"invalid --since {value!r}: use an RFC 3339 time, a Unix time or a duration like 10m"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    nanoseconds = int(fraction.group(1)[:9].ljust(9, "0")) if fraction else 0
    return timestamp(int(parsed.timestamp()) * 10**9 + nanoseconds)
