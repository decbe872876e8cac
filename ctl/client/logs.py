"""Container logs in the CRI log format, as the shim writes them for a `file://...?format=cri`
stdout URI (see shimd/stdio.py) and ctl's own copy of a foreground run does.

One record per line: `<RFC3339Nano UTC> <stdout|stderr> <F|P> <data>`; `P` records are
parts of a line whose rest follows (no newline after them). The fixed-width UTC
timestamps compare as strings, so `--since`/`--until` need no date parsing per line.

Rotation (`--log-opt max-size=… max-file=…`, docker's json-file options): the URI carries
them, `file://PATH?format=cri&max-size=N&max-file=M`; both writers (the shim for a detached
task, ctl for its copy of a foreground run) use runtimed.logfile's `RotatingFile`, which
renames PATH to PATH.1 (PATH.1 to PATH.2 …) before a write would take PATH past max-size;
max-file 1 truncates PATH instead. The URI, the records' encoding and the rotation live in
runtimed.logfile (re-exported here). `open_set` reads the set oldest first and `Follower`
follows PATH across rotations.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from runtimed.errors import InvalidArgument

# the file's format, URI and rotation are the shim's too: one implementation
from runtimed.logfile import (  # noqa: F401 - re-exported, ctl.client's log API
    RotatingFile,
    encode,
    remove_set,
    rotation,
    timestamp,
    uri,
)
from runtimed.logfile import options as uri_options  # noqa: F401


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

    def open_since(self, stamp: bytes) -> bool:
        """True if a line still open (its end not read yet) began at or before `stamp`."""
        return any(line.timestamp <= stamp for line in self._open.values())

    def flush(self) -> Iterator[Line]:
        """Parts never completed (the process ended without a newline)."""
        lines = sorted(self._open.values(), key=lambda line: line.timestamp)
        self._open.clear()
        yield from lines


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def since(value: str, now: float | None = None, flag: str = "--since") -> bytes:
    """docker's `--since` and `--until`: an RFC 3339 time, a Unix time, or a duration ago
    (`10m`, `1h30m`); as the timestamp string records compare against."""
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
            f"invalid {flag} {value!r}: use an RFC 3339 time, a Unix time or a duration like 10m"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    nanoseconds = int(fraction.group(1)[:9].ljust(9, "0")) if fraction else 0
    return timestamp(int(parsed.timestamp()) * 10**9 + nanoseconds)


def rotated_paths(path: str) -> list[str]:
    """PATH.1, PATH.2 … that exist, newest first."""
    return [f"{path}.{n}" for n in sorted(_numbers(path))]


def _key(f) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


def _open_rotated(path: str, live: tuple | None, stop_at: tuple | None) -> list:
    """PATH.1, PATH.2 … open, newest first, each inode once, up to the file `stop_at`
    (`live`: the file opened as PATH, skipped if met).

    A rotation meanwhile moves files to higher numbers, from the top down, so a name may
    be missing for a moment: walking the numbers upwards, a file not yet opened stays
    ahead, one opened already is recognised by its inode, and files are met newest first
    as long as PATH itself was not renamed (`_snapshot` checks that). Past the highest
    number, the directory is listed again in case the set grew."""
    files: list = []
    seen = {live}
    highest = max(_numbers(path), default=0)
    n = 0
    while True:
        n += 1
        try:
            f = open(f"{path}.{n}", "rb")
        except FileNotFoundError:
            if n >= highest:
                highest = max(_numbers(path), default=0)
                if n >= highest:
                    return files
            continue
        key = _key(f)
        if key == stop_at or key in seen:
            f.close()
            if key == stop_at:
                return files
            continue
        seen.add(key)
        files.append(f)


def _numbers(path: str) -> list[int]:
    directory, base = os.path.split(path)
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    return [int(name[len(base) + 1:]) for name in names
            if name.startswith(base + ".") and name[len(base) + 1:].isdigit()]


def _snapshot(path: str, stop_at: tuple | None = None, attempts: int = 50):
    """(PATH open or None, the rotated files newer than `stop_at` open, newest first), as
    of one moment: taken again while PATH was renamed during the walk (a rotation
    finished), which is what could reorder it."""
    for attempt in range(attempts):
        try:
            live = open(path, "rb")
            key = _key(live)
        except FileNotFoundError:
            live, key = None, None
        rotated = _open_rotated(path, key, stop_at)
        try:
            st = os.stat(path)
            now = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            now = None
        if now == key or attempt == attempts - 1:
            return live, rotated
        for f in [live, *rotated]:
            if f is not None:
                f.close()
    raise AssertionError("unreachable")


def open_set(path: str) -> list:
    """The log file and its rotated files, open, oldest first: the live one last (none
    while it does not exist)."""
    live, rotated = _snapshot(path)
    rotated.reverse()
    return rotated + ([live] if live is not None else [])


class Follower:
    """`logs -f`: what was appended to PATH since the last read, across rotations (the
    rest of the file that was renamed away, any rotated while we slept, then the new PATH)
    and a truncation (max-file 1). `files`: what `open_set` gave and was read (the live
    one is kept open and followed; the others may be closed)."""

    def __init__(self, path: str, files: list):
        self.path = path
        self.file = files[-1] if files and files[-1].name == path else None
        self.last = _key(files[-1]) if files and self.file is None else None  # read already

    def read(self) -> bytes:
        data = b""
        if self.file is not None:
            data = self.file.read()
            ours = _key(self.file)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:  # between a rotation's rename and its new file
                return data
            if (current.st_dev, current.st_ino) == ours:
                if os.fstat(self.file.fileno()).st_size < self.file.tell():  # truncated
                    self.file.seek(0)
                    data += self.file.read()
                return data
            data += self.file.read()  # written before the rotation, after our last read
            self.file.close()
            self.file, self.last = None, ours
        live, newer = _snapshot(self.path, self.last)
        for f in reversed(newer):  # rotated away before we looked: oldest first
            with f:
                data += f.read()
                self.last = _key(f)
        if live is not None:
            self.file = live
            data += live.read()
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
