"""The event outbox: every lifecycle event is appended to a file in the bundle and kept
until runtimed's record `runtimed.json` (next to it) says runtimed has published it, so
events survive a runtimed restart in order. runtimed follows the file; nothing is sent
back: the shim trims by that record.

No fsync here (nor in `write_atomic`): these files live in the state dir, which is per
boot. A crash of runtimed or of the shim loses nothing the kernel already has; only a
machine crash would, and that takes every container and shim with it, so the files
would be stale anyway. fsyncs cost ~2.5 ms each on this disk, ~20 per lifecycle.

File format: JSON lines. The first line may be `{"acked": N}`, the highest sequence
number trimmed (runtimed had published it); sequence numbers keep rising past trims.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

TRIM_AFTER = 256  # unacknowledged events before an append trims what runtimed published
RECORD = "runtimed.json"  # runtimed's record of the bundle, next to the outbox: `seq` is
# the last event it published (runtimed/runtime/tasks.py, `_record_published`)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file, rename: readers (and a process killed mid-write) see the old
    or the new, never half. For state-dir files only (not fsync'd, see above)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # no temp file left beside what it failed to replace
            os.unlink(tmp)
        raise


def parse(data: bytes) -> tuple[int, list[dict]]:
    """(acked, events not acknowledged) of an outbox's bytes; a last line without its
    newline (an append in progress, or torn by a crash) is not an event yet."""
    acked, events = 0, []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "acked" in record:
            acked = record["acked"]
        elif record["seq"] > acked:
            events.append(record)
    return acked, events


def read_after(path: Path, seq: int) -> list[dict]:
    """The events in the outbox at `path` after `seq`, read without changing the file:
    how runtimed follows a shim's outbox while the shim appends to it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [e for e in parse(data)[1] if e["seq"] > seq]


def published_seq(path: Path) -> int | None:
    """The sequence number in runtimed's record (`RECORD`), or None. runtimed rewrites it
    in place (one pwrite), so a read racing that write may be torn ("199" becoming "200"
    read as "299", past what was published): it is read until two reads agree."""
    last = None
    for _ in range(20):
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if data == last:
            try:
                return int(json.loads(data)["seq"])
            except (ValueError, KeyError, TypeError):
                return None
        last = data
    return None


class Outbox:
    def __init__(self, path: Path):
        self.path = path
        self.acked = 0
        self.events: list[dict] = []
        self._changed = asyncio.Condition()
        self._load()
        self.seq = self.events[-1]["seq"] if self.events else self.acked

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):  # torn by a crash mid-append: never acknowledged
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        self.acked, self.events = parse(data)

    async def append(self, topic: str, **fields) -> dict:
        self.seq += 1
        event = {"seq": self.seq, "topic": topic, "timestamp": _now(), **fields}
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self.events.append(event)
        if len(self.events) >= TRIM_AFTER:
            self.trim()
        async with self._changed:
            self._changed.notify_all()
        return event

    def after(self, seq: int) -> list[dict]:
        return [e for e in self.events if e["seq"] > seq]

    async def wait(self, seq: int) -> list[dict]:
        """Events after `seq`, waiting until there is at least one."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.seq > seq)
        return self.after(seq)

    def trim(self) -> None:
        """Drop what runtimed has published: its record (`RECORD`), next to the outbox
        (`{..., "seq": N, ...}`, written in place). runtimed follows the file and sends no Acks
        (a call would wake a retired worker, shimd/keeper.py); the shim trims when its
        worker retires and whenever many events have piled up."""
        seq = published_seq(self.path.with_name(RECORD))
        if seq is not None:
            self.ack(seq)

    def ack(self, seq: int) -> None:
        if seq <= self.acked:
            return
        self.acked = min(seq, self.seq)
        self.events = [e for e in self.events if e["seq"] > self.acked]
        lines = [json.dumps({"acked": self.acked})] + [
            json.dumps(e, separators=(",", ":")) for e in self.events
        ]
        write_atomic(self.path, ("\n".join(lines) + "\n").encode())


def _now() -> float:
    import time

    return time.time()
