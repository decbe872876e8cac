"""The process that stages layers for the daemon (diff/staging.py), beside it.

In the daemon's own process the staging threads and the event loop took turns at the
GIL: the loop, which parses every HTTP/2 frame of the image streaming in, answered each
Content.Write message ~1.3 ms later than without staging. Here the work has its own
interpreter (and the machine's other core).

One JSON object per line on stdin, answers on stdout:

    {"op": "start", "id": N, "path": ingest data file, "root": directory to apply into,
     optionally "limit" and "final" as below}
    {"op": "grow", "id": N, "limit": bytes written so far}
    {"op": "final", "id": N}       the ingest was committed: its end is the last limit
    {"op": "abandon", "id": N}     it was not: stop
    -> {"id": N, "ok": true, "result": {ApplyResult's fields}} | {"id": N, "ok": false, "error": ...}

The daemon owns the directories: it removes one when the answer says it is not used.
It exits after IDLE_EXIT seconds without work, and when stdin closes (the daemon
stopped or died): then it abandons what runs and removes those directories itself, once
nothing writes into them (nobody is left to read the answers, and a daemon started
again at once may have emptied the staging directory already). So does it with the
directory of an answer it could not send (the daemon died before stdin told it so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import sys
import threading

from runtimed.diff.apply import apply_layer

IDLE_TIMEOUT = 60.0  # an ingest sending nothing for this long is not followed further
# below the daemon and its clients: staging uses a core they leave idle, and on a busy
# machine does not slow down the transfer it runs beside
NICENESS = 10
IDLE_EXIT = 300.0  # with nothing to do for this long, exit (the daemon starts another)
DROP_BEHIND = 8 << 20  # the daemon starts the writeback every 8 MiB (content/store.py)
STOP_TIMEOUT = 10.0  # at exit, wait this long at most for an abandoned staging to stop


class Growing(io.RawIOBase):
    """A file read while it is written: a read waits for bytes not written yet; the end
    is the size it was committed with. What it read leaves the page cache, DROP_BEHIND
    behind the reader: a staged blob is seldom read again (a push, a save), and its
    pages, freed as the import goes, are the ones the next writes take (docs/snapshots.md)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.pos = 0
        self.dropped = 0  # what was read before this offset is out of the page cache
        self.limit = 0
        self.final = False
        self.gone = False
        self.cond = threading.Condition()

    def readable(self) -> bool:
        return True

    def update(self, limit: int | None = None, final: bool = False, gone: bool = False) -> None:
        with self.cond:
            if limit is not None:
                self.limit = max(self.limit, limit)
            self.final = self.final or final
            self.gone = self.gone or gone
            self.cond.notify()

    def readinto(self, buffer) -> int:
        with self.cond:
            while self.pos >= self.limit and not self.final and not self.gone:
                if not self.cond.wait(IDLE_TIMEOUT):
                    self.gone = True
            if self.gone:
                raise OSError(errno.ECANCELED, "the ingest was not committed")
            available = self.limit - self.pos
        if available <= 0:
            return 0
        n = os.preadv(self.fd, [memoryview(buffer)[:available]], self.pos)
        self.pos += n
        if self.pos - self.dropped >= 2 * DROP_BEHIND:
            self._drop(self.pos - DROP_BEHIND)
        return n

    def _drop(self, end: int) -> None:
        """Take what was read before `end` out of the page cache (pages written back:
        dirty ones stay)."""
        if end > self.dropped:  # (a length of 0 means "to the end of the file")
            with contextlib.suppress(OSError):  # only advice: never fails a staging
                os.posix_fadvise(self.fd, self.dropped, end - self.dropped, os.POSIX_FADV_DONTNEED)
            self.dropped = end

    def close(self) -> None:
        if not self.closed:
            self._drop(self.pos)
            os.close(self.fd)
        super().close()


class Stager:
    def __init__(self, out: int):
        self.out = out  # a file descriptor
        self.out_lock = threading.Lock()
        self.jobs: dict[int, tuple[Growing, threading.Thread]] = {}
        self.slots = threading.BoundedSemaphore(2)
        self.stopping = False

    def handle(self, msg: dict) -> None:
        op, job = msg["op"], msg["id"]
        if op == "start":
            try:
                source = Growing(msg["path"])
            except OSError as exc:
                if not self.answer({"id": job, "ok": False, "error": str(exc)}):
                    shutil.rmtree(msg["root"], ignore_errors=True)  # as run() does
                return
            source.update(limit=msg.get("limit"), final=msg.get("final", False))
            thread = threading.Thread(target=self.run, args=(job, source, msg["root"]),
                                      daemon=True)
            self.jobs[job] = (source, thread)
            thread.start()
            return
        running = self.jobs.get(job)
        if running is None:
            return
        source = running[0]
        if op == "grow":
            source.update(limit=msg["limit"])
        elif op == "final":
            source.update(final=True)
        elif op == "abandon":
            source.update(gone=True)

    def run(self, job: int, source: Growing, root: str) -> None:
        with self.slots:
            try:
                with source:
                    result = apply_layer(source, root, overlay=True, parents=[])
                answer = {"id": job, "ok": True, "result": dataclasses.asdict(result)}
            except Exception as exc:  # noqa: BLE001 - reported: the daemon extracts instead
                answer = {"id": job, "ok": False, "error": str(exc)}
        # the daemon is gone (it stopped, or died before we saw stdin close, and the
        # answer fails): nobody else removes it
        if self.stopping or not self.answer(answer):
            shutil.rmtree(root, ignore_errors=True)
        self.jobs.pop(job, None)  # (after: stop() waits for what it finds here)

    def answer(self, message: dict) -> bool:
        """Send `message`; False when the daemon is gone (stop() follows)."""
        data = (json.dumps(message) + "\n").encode()
        with self.out_lock:
            try:
                while data:
                    data = data[os.write(self.out, data):]
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Abandon what runs; return once it stopped and removed its directories."""
        self.stopping = True
        jobs = list(self.jobs.values())
        for source, _ in jobs:
            source.update(gone=True)
        for _, thread in jobs:
            thread.join(STOP_TIMEOUT)


def main() -> int:
    import select

    os.nice(NICENESS)
    stager = Stager(sys.stdout.fileno())
    stdin = sys.stdin.buffer
    pending = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], IDLE_EXIT)
        if not ready and not stager.jobs:
            break  # idle: the daemon starts another for the next layer
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 1 << 16)
        if not chunk:
            break  # the daemon is gone
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            try:
                stager.handle(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                print(f"stager: bad request {line!r}: {exc}", file=sys.stderr)
    stager.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
