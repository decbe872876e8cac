"""A container's log file: its URI, its CRI records and its rotation, in one place for the
shim (which writes a detached task's log) and ctl (which writes its copy of a foreground
run and reads both). Imports nothing heavy: ctl loads it on its start-up path.

The URI is `file://PATH` with an optional query: `format=cri` asks for one CRI log record
per line, `<RFC3339Nano UTC> <stdout|stderr> <F|P> <data>` (`P`: a part of a line whose rest
follows); `max-size=N&max-file=M` (bytes; docker's json-file options) rotate the file: PATH
becomes PATH.1 (PATH.1 PATH.2 …, the one past max-file − 1 replaced) before a write would
take PATH past max-size, and writing goes on in a fresh PATH; max-file 1 truncates PATH.
"""

from __future__ import annotations

import os
import time

from runtimed.errors import InvalidArgument

PREFIX = "file://"


def uri(path: str, cri: bool = True, max_size: int = 0, max_file: int = 1) -> str:
    """The stdout/stderr URI of a container's log file (ctl stores it as a label; the
    restart manager reuses it)."""
    query = ["format=cri"] if cri else []
    if max_size:
        query += [f"max-size={max_size}", f"max-file={max_file}"]
    return PREFIX + path + ("?" + "&".join(query) if query else "")


def path_of(value: str) -> str | None:
    """PATH of a `file://PATH?…` URI; None for anything else (a FIFO path, empty)."""
    return value[len(PREFIX):].partition("?")[0] if value.startswith(PREFIX) else None


def options(value: str) -> dict[str, str]:
    """`file://PATH?a=1&b=2` → {"a": "1", "b": "2"}; {} for what is not a `file://` URI."""
    if not value.startswith(PREFIX):
        return {}
    query = value.partition("?")[2]
    return dict(item.partition("=")[::2] for item in query.split("&") if item)


def is_cri(value: str) -> bool:
    return options(value).get("format") == "cri"


def rotation(value: str) -> tuple[int, int] | None:
    """(max-size, max-file) from a log URI; None when its file is not rotated (no
    max-size, or 0). Values that are not integers are an InvalidArgument (a hand-made URI:
    ctl checks `--log-opt` before it writes one)."""
    opts = options(value)
    try:
        max_size, max_file = int(opts.get("max-size", 0)), int(opts.get("max-file", 1))
    except ValueError:
        raise InvalidArgument(f"invalid log rotation options in {value!r}") from None
    return (max_size, max(max_file, 1)) if max_size > 0 else None


def rotated_names(path: str, max_file: int) -> list[str]:
    """PATH.1 … PATH.<max-file − 1>: the names a rotation may have made."""
    return [f"{path}.{n}" for n in range(1, max_file)]


def remove_set(value: str) -> None:
    """Remove the log file of a `file://` URI and, when the URI rotates it, PATH.1 …
    PATH.<max-file − 1> (`rm`, and the daemon's autoremove). Only those: a user's FILE may
    have neighbours named FILE.N that are not ours; a URI with bad rotation options takes
    PATH only."""
    path = path_of(value)
    if path is None:
        return
    try:
        rotate = rotation(value)
    except InvalidArgument:
        rotate = None
    for name in [path, *(rotated_names(path, rotate[1]) if rotate else ())]:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def timestamp(ns: int) -> bytes:
    """A record's stamp: fixed width, so stamps compare as strings."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % nanos


def encode(data: bytes, stream: str | bytes, now_ns: int | None = None) -> bytes:
    """One chunk of output (one read) as CRI records, all with the same timestamp."""
    if isinstance(stream, str):
        stream = stream.encode()
    prefix = timestamp(time.time_ns() if now_ns is None else now_ns) + b" " + stream
    lines = data.split(b"\n")
    last = lines.pop()
    out = b"".join(prefix + b" F " + line + b"\n" for line in lines)
    if last:
        out += prefix + b" P " + last + b"\n"
    return out


class RotatingFile:
    """An append-only log file that rotates before a write would take it past `max_size`.
    Writes are cut at line ends where one fits, so a record stays whole in one file unless
    it is longer than `max_size` by itself."""

    def __init__(self, path: str, max_size: int, max_file: int, fd: int | None = None):
        """`fd`: the file already open (a shim's next worker takes it over, shimd/keeper.py:
        the path may be gone or unwritable by then)."""
        self.path, self.max_size, self.max_file = path, max_size, max_file
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.fd = fd
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes | bytearray) -> int:
        done, total = 0, len(data)
        with memoryview(data) as view:
            while done < total:
                room = self.max_size - self.size
                end = total
                if total - done > room:
                    cut = data.rfind(b"\n", done, done + max(room, 0))
                    if cut >= 0:
                        end = cut + 1
                    elif self.size:
                        self._rotate()
                        continue
                    else:  # one line longer than max-size on its own: cut it
                        end = done + room
                written = os.write(self.fd, view[done:end])
                done += written
                self.size += written
        return total

    def _rotate(self) -> None:
        if self.max_file < 2:  # docker's json-file with max-file 1: start the file over
            os.ftruncate(self.fd, 0)
            self.size = 0
            return
        for n in range(self.max_file - 1, 0, -1):
            try:
                os.rename(self.path if n == 1 else f"{self.path}.{n - 1}", f"{self.path}.{n}")
            except FileNotFoundError:
                pass
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.close(self.fd)
        self.fd, self.size = fd, 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
