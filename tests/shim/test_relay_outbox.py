"""runtimed's side of following a shim's outbox (runtimed/runtime/outboxes.py), against the
shim's own Outbox writing the file: inotify wakes the follower on appends and on the
trim's temp + rename, reads return the events in order (after a trim, the new file from
its start: the relay skips what it published), a line still being written is left for
the next read, and the reader follows its bundle when it is moved."""

from __future__ import annotations

import asyncio
import os

from runtimed.runtime.outboxes import OUTBOX, OutboxReader, OutboxWatcher
from shimd.outbox import Outbox


def test_appends_and_trims_are_followed_once_in_order(tmp_path):
    async def scenario():
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        outbox = Outbox(bundle / OUTBOX)
        await outbox.append("/tasks/create", pid=1)  # before the watch: read at once
        watcher, woken = OutboxWatcher(), asyncio.Event()
        watcher.watch(bundle, woken.set)
        reader = OutboxReader(bundle)
        seen = [e["seq"] for e in reader.read()]
        assert seen == [1]

        async def next_events() -> list[int]:
            await asyncio.wait_for(woken.wait(), 10)
            woken.clear()
            return [e["seq"] for e in reader.read()]

        await outbox.append("/tasks/start", pid=1)
        assert await next_events() == [2]
        (bundle / "runtimed.json").write_text("{}")  # other files of the bundle wake nobody
        await asyncio.sleep(0.05)
        assert not woken.is_set()
        await outbox.append("/tasks/exec-added", exec_id="e")
        outbox.ack(2)  # the shim's trim: temp + rename
        await outbox.append("/tasks/exec-started", exec_id="e", pid=2)
        # the file was replaced: read again from its start (what follows its ack line)
        got = []
        while got[-1:] != [4]:
            got += await next_events()
        assert got in ([3, 4], [3, 3, 4]), got

        # an append in progress (no newline yet) is no event until it is complete; its
        # writer wakes the follower when it closes the file
        fd = os.open(bundle / OUTBOX, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b'{"seq":5,"topic":"/tasks/exit","timestamp":1')
        assert reader.read() == []
        os.write(fd, b"}\n")
        os.close(fd)
        outbox.seq = 5
        assert await next_events() == [5]

        # the bundle moved (Delete retires it to the trash): followed once pinned
        reader.pin()
        moved = tmp_path / "trash"
        os.rename(bundle, moved)
        outbox.path = moved / OUTBOX
        await outbox.append("/tasks/delete", pid=1)
        assert await next_events() == [6]
        watcher.unwatch(moved)  # a path it never watched: nothing happens
        watcher.unwatch(bundle)
        await outbox.append("/tasks/exit", pid=3)
        await asyncio.sleep(0.05)
        assert not woken.is_set()
        reader.close()
        watcher.close()

    asyncio.run(scenario())


def test_a_removed_bundle_ends_its_watch(tmp_path):
    async def scenario():
        watcher = OutboxWatcher()
        bundles = [tmp_path / name for name in ("a", "b")]
        woken = {b.name: asyncio.Event() for b in bundles}
        for bundle in bundles:
            bundle.mkdir()
            watcher.watch(bundle, woken[bundle.name].set)
        (bundles[0] / OUTBOX).write_text("")
        os.unlink(bundles[0] / OUTBOX)
        os.rmdir(bundles[0])
        (bundles[1] / OUTBOX).write_text('{"seq":1,"topic":"/tasks/oom"}\n')
        await asyncio.wait_for(woken["b"].wait(), 10)
        assert list(watcher._wds) == [bundles[1]]  # the removed one's watch is forgotten
        watcher.close()

    asyncio.run(scenario())


def test_dropped_notifications_wake_every_follower(tmp_path):
    """The kernel's queue overflowed (IN_Q_OVERFLOW): what it dropped may have been an
    append, so every follower looks again (an outbox appended to then was never read)."""
    async def scenario():
        watcher = OutboxWatcher()
        quiet, busy = tmp_path / "quiet", tmp_path / "busy"
        woken = asyncio.Event()
        for bundle in (quiet, busy):
            bundle.mkdir()
        watcher.watch(quiet, woken.set)
        watcher.watch(busy, lambda: None)
        with open("/proc/sys/fs/inotify/max_queued_events") as limit:
            overflow = int(limit.read()) + 16
        # not outboxes: their closes wake nobody but fill the queue (two names taking
        # turns: the kernel merges a notification with the same one queued just before)
        others = [busy / "other0", busy / "other1"]
        for i in range(overflow):  # with no read in between (the loop does not run)
            os.close(os.open(others[i % 2], os.O_WRONLY | os.O_CREAT))
        with open(quiet / OUTBOX, "ab") as outbox:  # its notification dropped
            outbox.write(b'{"seq":1,"topic":"/tasks/oom"}\n')
        await asyncio.wait_for(woken.wait(), 10)
        assert [e["seq"] for e in OutboxReader(quiet).read()] == [1]
        watcher.close()

    asyncio.run(scenario())


def test_a_trimmed_file_on_a_reused_inode_is_read_from_its_start(tmp_path):
    """Same inode, size past the last read's end, yet another file: two trims between
    reads can give the new file the inode of the old (removed) one. Told by the first
    line, the trim's acked record."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    path = bundle / OUTBOX

    def lines(acked: int, seqs) -> bytes:
        return b"".join([f'{{"acked": {acked}}}\n'.encode()] + [
            f'{{"seq":{s},"topic":"/tasks/oom","timestamp":1}}\n'.encode() for s in seqs])

    path.write_bytes(lines(2, [3, 4]))
    reader = OutboxReader(bundle)
    assert [e["seq"] for e in reader.read()] == [3, 4]
    with open(path, "r+b") as f:  # rewritten in place: the inode stays, the size grows
        f.write(lines(4, [5, 6, 7]))
    assert [e["seq"] for e in reader.read()] == [5, 6, 7]
    with open(path, "ab") as f:
        f.write(lines(0, [8])[len(lines(0, [])):])
    assert [e["seq"] for e in reader.read()] == [8]  # an append: read on from the end


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path):
    """`write_atomic` that cannot replace its target (here a directory) raises and leaves
    neither the target changed nor its `.NAME.tmp` beside it (a shim that failed to
    publish its address left one in the bundle)."""
    import pytest

    from shimd.outbox import write_atomic

    (tmp_path / "address").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "address", b"unix:///x.sock")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["address"]
    write_atomic(tmp_path / "pid", b"42")
    assert (tmp_path / "pid").read_bytes() == b"42"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["address", "pid"]
