"""The Python client library used directly, as an orchestrator would, against runtimed."""

from __future__ import annotations

import threading

import pytest

from ctl.client import Client, SpecOptions
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)


def test_typed_errors(daemon, busybox, tmp_path):
    with Client(daemon.address) as c:
        with pytest.raises(NotFound, match="no such image"):
            c.images.get("example.com/nothing:1")
        with pytest.raises(NotFound, match="no such container"):
            c.containers.get("ghost")
        with pytest.raises(InvalidArgument):
            c.containers.create("Bad Id!", "busybox")
        c.containers.create("dup", "busybox", SpecOptions(args=["true"]))
        with pytest.raises(AlreadyExists):
            c.containers.create("dup", "busybox", SpecOptions(args=["true"]))
        c.containers.remove("dup")
        assert c.containers.list() == []
    with Client(str(tmp_path / "absent.sock")) as c, pytest.raises(Unavailable, match="is the daemon running"):
        c.version()


def test_run_context_manager_cleans_up(daemon, busybox):
    with Client(daemon.address) as c:
        image = c.images.get("busybox")
        resolved = c.images.resolve(image)
        assert resolved.chain_id.startswith("sha256:") and resolved.size > 0
        assert c.images.read_file(resolved, "/etc/passwd").startswith(b"root:")
        with c.run("lib1", "busybox", SpecOptions(args=["sh", "-c", "echo out; echo err >&2; exit 6"])) as box:
            status = box.wait(timeout=30)
            assert (status.code, box.output(), box.errors()) == (6, b"out\n", b"err\n")
        assert c.containers.list() == [] and c.tasks.list() == []
        with c.run("lib2", "busybox", SpecOptions(args=["sleep", "1000"])) as box:
            assert c.tasks.get("lib2").status == "RUNNING"
            assert len(c.tasks.pids("lib2")) == 1
            c.tasks.pause("lib2")
            assert c.tasks.get("lib2").status == "PAUSED"
            with pytest.raises(FailedPrecondition):
                c.containers.remove("lib2")  # running: refused without force
            c.tasks.resume("lib2")
            [stats] = c.tasks.metrics(["lib2"])
            assert stats.pids >= 1 and stats.memory_usage > 0
        assert c.containers.list() == []  # left running: killed and removed on exit


def test_events_iterator_with_filters(daemon, busybox):
    with Client(daemon.address) as c:
        stream = c.events(['topic~="^/containers/"'])
        seen = []

        def collect():
            for event in stream:
                seen.append(event)
                if event.topic == "/containers/delete":
                    return

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        for attempt in range(10):  # the subscription starts asynchronously
            c.containers.create(f"ev{attempt}", "busybox", SpecOptions(args=["true"]))
            c.containers.remove(f"ev{attempt}")
            reader.join(1)
            if not reader.is_alive():
                break
        stream.cancel()
        reader.join(5)
        topics = [e.topic for e in seen]
        assert "/containers/create" in topics and "/containers/delete" in topics
        assert all(t.startswith("/containers/") for t in topics)
        created = next(e for e in seen if e.topic == "/containers/create")
        assert created.namespace == "default" and created.payload["id"].startswith("ev")


def test_a_lease_belongs_to_the_thread_that_took_it(daemon):
    """One client serves many threads (orchestrators, `bench`): a lease taken in one
    thread must not be used, nor ended, by calls from another."""
    with Client(daemon.address) as client:
        taken = threading.Event()
        release = threading.Event()
        seen = {}

        def holder():
            with client.lease() as lease:
                seen["holder"] = lease
                taken.set()
                release.wait(10)

        thread = threading.Thread(target=holder)
        thread.start()
        taken.wait(10)
        seen["other"] = client.lease_id
        with client.lease() as own:
            seen["own"] = own
        release.set()
        thread.join(10)
    assert seen["other"] is None
    assert seen["own"] != seen["holder"]
