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
