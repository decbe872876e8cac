"""The pure task state machine and the persisted outbox."""

from __future__ import annotations

import asyncio

import pytest

from runtimed.errors import AlreadyExists, FailedPrecondition, NotFound
from shimd.lifecycle import INIT, Lifecycle, Status
from shimd.outbox import Outbox


def topics(events):
    return [e.topic for e in events]


def test_exit_during_start_is_held_until_the_start_event():
    life = Lifecycle("c")
    assert topics(life.created(10)) == ["/tasks/create"]
    life.start_begun(INIT)
    assert life.exited(INIT, 3) == []  # the process ran before `start` returned
    events = life.started(INIT, 10)
    assert topics(events) == ["/tasks/start", "/tasks/exit"]
    assert events[1].exit_status == 3
    assert life.init.status == Status.STOPPED


def test_exit_is_reported_once_and_delete_needs_a_stopped_process():
    life = Lifecycle("c")
    life.created(10)
    life.start_begun(INIT)
    life.started(INIT, 10)
    with pytest.raises(FailedPrecondition):
        life.deleted(INIT)
    assert topics(life.exited(INIT, 137)) == ["/tasks/exit"]
    assert life.exited(INIT, 137) == []
    deleted = life.deleted(INIT)
    assert topics(deleted) == ["/tasks/delete"] and deleted[0].exit_status == 137
    with pytest.raises(NotFound):
        life.get(INIT)


def test_exec_rules():
    life = Lifecycle("c")
    life.created(10)
    assert topics(life.exec_added("e1")) == ["/tasks/exec-added"]
    with pytest.raises(AlreadyExists):
        life.exec_added("e1")
    life.start_begun("e1")
    assert topics(life.started("e1", 11)) == ["/tasks/exec-started"]
    life.start_begun(INIT)
    life.started(INIT, 10)
    with pytest.raises(FailedPrecondition):
        life.deleted(INIT)  # exec e1 still runs
    life.exited("e1", 0)
    life.exited(INIT, 0)
    with pytest.raises(FailedPrecondition):
        life.exec_added("e2")


def test_pause_resume_need_the_right_status():
    life = Lifecycle("c")
    life.created(10)
    with pytest.raises(FailedPrecondition):
        life.paused()
    life.start_begun(INIT)
    life.started(INIT, 10)
    assert topics(life.paused()) == ["/tasks/paused"]
    assert topics(life.resumed()) == ["/tasks/resumed"]
    with pytest.raises(FailedPrecondition):
        life.resumed()


def test_outbox_survives_reload_and_keeps_sequence_past_acks(tmp_path):
    async def scenario():
        box = Outbox(tmp_path / "events.jsonl")
        for topic in ("/tasks/create", "/tasks/start", "/tasks/exit"):
            await box.append(topic, id="c")
        box.ack(2)
        return box

    box = asyncio.run(scenario())
    assert [e["seq"] for e in box.after(0)] == [3]
    again = Outbox(tmp_path / "events.jsonl")  # a shim reading its bundle back
    assert again.acked == 2 and again.seq == 3
    assert [e["topic"] for e in again.after(0)] == ["/tasks/exit"]
    again.ack(3)
    third = Outbox(tmp_path / "events.jsonl")
    assert third.after(0) == [] and third.seq == 3


def test_outbox_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"seq":1,"topic":"/tasks/create"}\n{"seq":2,"top')
    box = Outbox(path)
    assert box.seq == 1
    asyncio.run(box.append("/tasks/start"))
    assert [e["seq"] for e in Outbox(path).after(0)] == [1, 2]


def test_outbox_trims_by_published_read_until_two_reads_agree(tmp_path, monkeypatch):
    """runtimed rewrites `published` in place while the shim may read it: a torn read
    ("19" becoming "20" read as "29") must not trim events runtimed has not published.
    The race cannot be timed in a test, so the reads are scripted: torn, then whole."""
    from pathlib import Path

    path = tmp_path / "events.jsonl"
    box = Outbox(path)

    async def fill():
        for _ in range(30):
            await box.append("/tasks/oom")

    asyncio.run(fill())
    published = tmp_path / "runtimed.json"
    torn, whole = (b'{"seq": %d, "init_exit": false}'.ljust(64) % seq for seq in (29, 20))
    reads = iter([torn, whole, whole])
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: next(reads) if self == published else read_bytes(self))
    box.trim()
    assert box.acked == 20
    assert [e["seq"] for e in Outbox(path).after(0)] == list(range(21, 31))


def test_reaper_keeps_early_exits_but_not_stale_ones():
    import os
    import time

    from shimd import reaper as reaper_module
    from shimd.reaper import Reaper

    async def scenario():
        reaper = Reaper()
        reaper.install()
        pid, done = reaper.spawn(["sh", "-c", "exit 7"], (0, 1, 2))
        assert await done == (7, pytest.approx(time.time(), abs=5))
        # a grandchild-like exit nobody waited for yet is kept for the claimer
        child = os.fork()
        if child == 0:
            os._exit(3)
        while child not in reaper._unclaimed:
            await asyncio.sleep(0.01)
        assert (await reaper.wait(child))[0] == 3
        # ... unless it is old: then it was an earlier process with that pid
        reaper._unclaimed[4242] = (1, time.time() - reaper_module.UNCLAIMED_TTL - 1)
        assert not reaper.wait(4242).done()

    asyncio.run(scenario())
