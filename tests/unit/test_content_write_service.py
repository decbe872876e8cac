"""Content.Write writes a message's bytes on the event loop only while writes are quick: a
write the disk makes slow must not hold the loop (and every other call) again."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb
from runtimed.content.store import Status
from runtimed.services import content


class RecordingWriter:
    """Records on which thread each write ran; the writes listed in `slow` are slow."""

    def __init__(self, slow: set[int]):
        self.slow = slow
        self.offset = 0
        self.threads: list[bool] = []  # True: the write ran on the event loop's thread
        self.loop_thread = threading.get_ident()

    def status(self) -> Status:
        return Status("ref", self.offset, 0, 0, 0)

    def digest(self) -> str:
        return "sha256:" + "0" * 64

    def write(self, data) -> int:
        self.threads.append(threading.get_ident() == self.loop_thread)
        if len(self.threads) - 1 in self.slow:
            time.sleep(content.INLINE_WRITE_LIMIT * 2.5)
        self.offset += len(data)
        return len(data)

    def write_is_plain(self, size: int) -> bool:
        return True

    def close(self) -> None:
        pass


def run_write(writer: RecordingWriter, messages: int) -> list[int]:
    store = SimpleNamespace(writer=lambda *a, **k: writer, exists=lambda *a: False)
    service = content.ContentService(SimpleNamespace(content=store, db=SimpleNamespace(run=None)))
    context = SimpleNamespace(invocation_metadata=lambda: ())

    async def requests():
        for n in range(messages):
            yield pb.WriteContentRequest(action=pb.WRITE, ref="ref", offset=n * 4), b"data"

    async def main():
        return [reply.offset async for reply in service.Write(requests(), context)]

    return asyncio.run(main())


def test_writes_go_to_the_loop_once_quick_and_back_to_a_thread_when_slow(monkeypatch):
    monkeypatch.setattr(content, "INLINE_WRITE_LIMIT", 0.05)  # quick ones stay quick under load
    writer = RecordingWriter(slow={2})
    offsets = run_write(writer, 6)
    assert offsets == [4, 8, 12, 16, 20, 24]
    # the first write of a stream runs on a thread (it may start a stager: not quick);
    # quick ones bring the next onto the loop; the slow third sends the fourth to a thread
    assert writer.threads == [False, True, True, False, True, True]


def run_store_write(tmp_path, monkeypatch, offsets, hook=None, on_thread=lambda: None):
    """Content.Write over a real store (with the ingest hook `hook`) of WRITE messages of 4
    bytes at `offsets`: the replies' offsets and, per write, True when it ran on the event
    loop's thread (`on_thread` runs before one that did not)."""
    from runtimed.content import store as store_module
    from runtimed.content.store import ContentStore
    from runtimed.metadata.db import Database
    from runtimed.metadata.leases import LeaseStore

    monkeypatch.setattr(content, "INLINE_WRITE_LIMIT", 60.0)  # every write counts as quick
    loop_thread = threading.get_ident()
    db = Database(tmp_path / "meta.db")
    store = ContentStore(tmp_path, db, LeaseStore(db))
    if hook is not None:
        store.add_ingest_hook(hook)
    writes: list[bool] = []
    plain_write = store_module.Writer.write

    def write(self, data):
        writes.append(threading.get_ident() == loop_thread)
        if not writes[-1]:
            on_thread()
        return plain_write(self, data)

    monkeypatch.setattr(store_module.Writer, "write", write)
    service = content.ContentService(SimpleNamespace(content=store, db=SimpleNamespace(run=None)))
    context = SimpleNamespace(invocation_metadata=lambda: ())

    async def requests():
        for offset in offsets:
            yield pb.WriteContentRequest(action=pb.WRITE, ref="ref", offset=offset), b"data"

    async def main():
        return [reply.offset async for reply in service.Write(requests(), context)]

    try:
        replies = asyncio.run(main())
    finally:
        db.close()
    return replies, writes


def test_a_blobs_first_bytes_run_the_ingest_hooks_on_a_thread(tmp_path, monkeypatch):
    """The first bytes of a blob run the store's ingest hooks (the layer stager may start
    its process there): on a thread, also when a stream restarts at offset 0 after quick
    writes (they ran on the event loop then)."""
    loop_thread = threading.get_ident()
    hooked: list[bool] = []  # True: the hook ran on the event loop's thread
    replies, writes = run_store_write(
        tmp_path, monkeypatch, [0, 4, 8, 0, 4],
        hook=lambda path, head: hooked.append(threading.get_ident() == loop_thread))
    assert replies == [4, 8, 12, 4, 8]
    assert hooked == [False, False]  # the blob's first bytes, twice
    assert writes == [False, True, True, False, True]


def test_a_write_that_would_wait_for_a_writeback_start_runs_on_a_thread(tmp_path, monkeypatch):
    """A write crossing WRITEBACK_EVERY waits for the previous writeback start (a
    sync_file_range, slow when the disk is congested): on a thread while that one runs."""
    from runtimed.content import store as store_module

    released = threading.Event()
    fallback = threading.Timer(3.0, released.set)  # on the old code: the loop waits that long
    fallback.start()
    monkeypatch.setattr(store_module, "WRITEBACK_EVERY", 8)
    monkeypatch.setattr(store_module, "_start_writeback",
                        lambda fd, offset, length: released.wait(5))
    # 0-4 first; 4-8 crosses 8 with no writeback running (loop) and starts one that hangs;
    # 8-12 loop; 12-16 crosses again while it hangs: a thread, which releases it; 16-20 loop
    threaded: list[int] = []

    def on_thread() -> None:
        threaded.append(1)
        if len(threaded) == 2:
            released.set()

    try:
        replies, writes = run_store_write(tmp_path, monkeypatch, [0, 4, 8, 12, 16],
                                          on_thread=on_thread)
    finally:
        fallback.cancel()
    assert replies == [4, 8, 12, 16, 20]
    assert writes == [False, True, True, False, True]


def test_a_quick_write_is_answered_before_its_bytes_are_written_and_written_before_the_next(
        tmp_path, monkeypatch):
    """The answer to a WRITE on the loop leaves before its bytes are hashed and go to the
    file (the client prepares its next message meanwhile), with the offset those bytes give
    and no digest; the bytes are hashed and in the file before the next message is read,
    and the blob commits whole."""
    import hashlib

    from runtimed.content import store as store_module
    from runtimed.content.store import ContentStore
    from runtimed.metadata.db import Database
    from runtimed.metadata.leases import LeaseStore

    monkeypatch.setattr(content, "INLINE_WRITE_LIMIT", 60.0)  # every write counts as quick
    events: list[str] = []
    plain_write = store_module.Writer.write

    def write(self, data):
        events.append(f"write {bytes(data).decode()}")
        return plain_write(self, data)

    monkeypatch.setattr(store_module.Writer, "write", write)
    db = Database(tmp_path / "meta.db")
    store = ContentStore(tmp_path, db, LeaseStore(db))
    service = content.ContentService(SimpleNamespace(content=store, db=SimpleNamespace(run=None)))
    context = SimpleNamespace(invocation_metadata=lambda: ())
    chunks = [b"aaaa", b"bbbb", b"cccc"]
    whole = b"".join(chunks)

    async def requests():
        for n, chunk in enumerate(chunks):
            events.append(f"read {chunk.decode()}")
            yield pb.WriteContentRequest(action=pb.WRITE, ref="ref", offset=4 * n), chunk
        events.append("read commit")
        yield pb.WriteContentRequest(action=pb.COMMIT, ref="ref", offset=12, total=12), b""

    async def main():
        replies = []
        async for reply in service.Write(requests(), context):
            events.append(f"answer {reply.offset}")
            replies.append((reply.offset, reply.digest))
        return replies

    try:
        replies = asyncio.run(main())
        digest = "sha256:" + hashlib.sha256(whole).hexdigest()
        assert b"".join(store.read_chunks("default", digest)) == whole
    finally:
        db.close()
    def running(n):
        return "sha256:" + hashlib.sha256(whole[:n]).hexdigest()

    # an answer ahead of its bytes carries no digest (content.proto: optional but for
    # COMMIT); one after them, and the COMMIT's, the digest of the bytes so far
    assert replies == [(4, running(4)), (8, ""), (12, ""), (12, running(12))]
    assert events == [
        "read aaaa", "write aaaa", "answer 4",  # a blob's first bytes: written, then answered
        "read bbbb", "answer 8", "write bbbb",
        "read cccc", "answer 12", "write cccc",
        "read commit", "answer 12",
    ]
