"""The relay (runtimed/runtime/tasks.py `_relay`) driven in-process on a bundle whose shim
is a plain process working in it: a record of what was published that cannot be written
loses no event, a rewrite of it reads whole, and without pidfds or inotify (out of fds)
the relay polls, never takes "cannot tell" for dead, and takes a shim pid some other
process got for gone (runtimed/runtime/shim.py `shim_running`)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import time
from contextlib import contextmanager

import pytest

from runtimed.runtime import tasks
from runtimed.runtime.shim import BundleInfo, ShimClient, shim_running
from runtimed.runtime.tasks import Task, TaskManager


class _Exchange:
    def __init__(self):
        self.topics: list[str] = []

    def forward(self, event):
        self.topics.append(event.topic)

    def publish(self, namespace, topic, message):
        self.topics.append(topic)


def _line(seq: int, topic: str, **fields) -> bytes:
    record = {"seq": seq, "topic": topic, "timestamp": time.time(), "id": "t", **fields}
    return json.dumps(record).encode() + b"\n"


@pytest.fixture
def shim(tmp_path):
    """A bundle with a "shim" (a sleep working in it, its pid in shim.pid)."""
    bundle = tmp_path / "state" / "tasks" / "tt" / "t"
    bundle.mkdir(parents=True)
    (bundle / "runtimed.json").write_text(json.dumps(
        {"namespace": "tt", "id": "t", "runtime": "", "rootfs_mounted": False}))
    process = subprocess.Popen(["sleep", "1000"], cwd=bundle)
    (bundle / "shim.pid").write_text(str(process.pid))
    yield bundle, process
    process.kill()
    process.wait()


def _task(bundle) -> Task:
    return Task("tt", "t", bundle, ShimClient("t", "unix:///dev/null", bundle),
                BundleInfo("tt", "t", "", False))


def test_the_record_rewritten_shorter_still_reads_whole(shim):
    """runtimed's record is rewritten in place (one pwrite): a shorter record is padded to
    the longest written before, so nothing of the old one is left after its end."""
    bundle, _ = shim
    task = _task(bundle)
    task.published, task.init_pid = 3, 123456789
    tasks._record_published(task)
    task.published, task.init_exit_published, task.init_pid = 4, True, 7
    tasks._record_published(task)
    assert tasks._read_published(bundle)[:3] == (4, True, 7)
    assert tasks.read_info(bundle) == task.info


def test_a_bundle_from_before_has_its_published_part_in_a_file_of_its_own(shim):
    """Until session 13 what runtimed had published was a file of its own, `published`:
    a runtimed restarted over such a bundle resumes from there."""
    bundle, _ = shim
    (bundle / "published").write_text('{"seq": 5, "init_exit": true, "pid": 9}'.ljust(64))
    assert tasks._read_published(bundle) == (5, True, 9, 0)


@contextmanager
def _out_of_fds():
    """This process's fds all taken (soft limit lowered to what is open, plus a few that
    are then filled), as a busy runtimed's can be; restored on leaving."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        try:
            while True:
                opened.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            pass
        yield
    finally:
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_published_record_that_cannot_be_written_loses_no_event(shim):
    """runtimed's record a directory (EISDIR, as EMFILE would): every event is still
    published in order and a Wait on the relayed exit returns (the write failure dropped
    the rest of the read batch and never notified)."""
    bundle, _ = shim
    (bundle / "runtimed.json").unlink()
    (bundle / "runtimed.json").mkdir()
    (bundle / "events.jsonl").write_bytes(
        _line(1, "/tasks/create", pid=7) + _line(2, "/tasks/start", pid=7)
        + _line(3, "/tasks/exit", pid=7, exit_status=3))
    exchange = _Exchange()

    async def scenario():
        manager = TaskManager(bundle.parents[2], None, exchange)
        task = _task(bundle)
        task.forwarder = asyncio.ensure_future(manager._relay(task))
        await asyncio.wait_for(manager._relayed_exit(task), 10)
        assert exchange.topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        assert task.init_exit is not None and task.init_exit.exit_status == 3
        assert not task.forwarder.done()  # still relaying
        task.removing = True
        await manager._stop_relay(task)
        manager.outboxes.close()

    asyncio.run(scenario())


def test_shim_running_tells_running_gone_elsewhere_and_cannot_tell(shim, tmp_path):
    bundle, process = shim
    assert shim_running(bundle) is True
    assert shim_running(bundle, process.pid) is True
    assert shim_running(tmp_path, process.pid) is False  # works elsewhere: a reused pid
    with _out_of_fds():
        assert shim_running(bundle) is None  # shim.pid cannot be read
        assert shim_running(bundle, process.pid) is True  # a readlink needs no fd
    process.kill()
    while open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    assert shim_running(bundle) is False  # a zombie has exited
    process.wait()
    assert shim_running(bundle) is False
    (bundle / "shim.pid").unlink()
    assert shim_running(bundle) is False


def test_out_of_fds_the_relay_polls_and_a_reused_pid_is_a_dead_shim(shim, monkeypatch):
    """Started with no fd to spare (no inotify fd, no pidfd, no outbox read, no pid file
    read), the relay keeps polling and keeps the live task (it died of EMFILE); once fds
    are free it relays what came meanwhile; a shim.pid naming a process that works
    elsewhere (the pid reused) is a dead shim (it counted as alive forever)."""
    bundle, process = shim
    monkeypatch.setattr(tasks, "POLL", 0.05)
    (bundle / "events.jsonl").write_bytes(_line(1, "/tasks/create", pid=7))
    exchange = _Exchange()

    async def scenario():
        manager = TaskManager(bundle.parents[2], None, exchange)
        task = _task(bundle)
        with _out_of_fds():
            task.forwarder = asyncio.ensure_future(manager._relay(task))
            await asyncio.sleep(0.3)  # a few polls, none of which can read anything
            assert not task.forwarder.done() and not task.dying
        for _ in range(200):
            if exchange.topics:
                break
            await asyncio.sleep(0.05)
        assert exchange.topics == ["/tasks/create"]
        with open(bundle / "events.jsonl", "ab") as outbox:
            outbox.write(_line(2, "/tasks/start", pid=7))
        for _ in range(200):
            if len(exchange.topics) == 2:
                break
            await asyncio.sleep(0.05)
        assert exchange.topics == ["/tasks/create", "/tasks/start"]
        assert not task.forwarder.done()
        (bundle / "shim.pid").write_text(str(os.getpid()))  # alive, working elsewhere
        await asyncio.wait_for(asyncio.shield(task.forwarder), 10)
        assert task.dying
        assert exchange.topics[-1] == "/tasks/exit"  # the dead shim's exit (255)
        assert task.init_exit.exit_status == tasks.DEAD_SHIM_EXIT
        assert not bundle.exists()  # cleaned up after
        manager.outboxes.close()

    asyncio.run(scenario())
