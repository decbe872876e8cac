"""The Python client library used directly, as an orchestrator would, against runtimed."""

from __future__ import annotations

import threading
import time

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


def _record_calls(monkeypatch, fail: dict[str, list[tuple[str, str]]] | None = None) -> list[str]:
    """The RPC methods (`Tasks/Delete`) the client calls from now on; `fail` makes the next
    calls of a method answer with the given (code, details) statuses, as a daemon would."""
    import ctl.client.wire as wire

    calls: list[str] = []
    real = wire.Channel.call

    def call(self, path, *args, **kwargs):
        method = path.rsplit(".", 1)[-1]
        calls.append(method)
        if fail and fail.get(method):
            raise wire.RpcError(*fail[method].pop(0))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(wire.Channel, "call", call)
    return calls


def test_a_created_record_carries_its_snapshot_mounts(daemon, busybox, monkeypatch):
    """The record `containers.create` returns carries the mounts Snapshots.Prepare answered
    (a field, not stored: a record from Get has none and compares equal); a task created
    from a record without them asks Snapshots.Mounts, with them it does not."""
    from ctl.client.types import RootfsMount

    with Client(daemon.address) as c:
        created = c.containers.create("mnt1", "busybox", SpecOptions(args=["echo", "from get"]))
        fetched = c.containers.get("mnt1")
        snaps = c._stub("snapshots")
        asked = snaps.Mounts(snaps.pb.MountsRequest(snapshotter=created.snapshotter, key="mnt1")).mounts
        assert created.rootfs == [RootfsMount.from_pb(m) for m in asked] and created.rootfs
        assert created.rootfs[0].type == "overlay" and any(o.startswith("upperdir=") for o in created.rootfs[0].options)
        assert fetched.rootfs is None and fetched == created
        calls = _record_calls(monkeypatch)
        c.tasks.create("mnt1", container=fetched)
        assert calls == ["Snapshots/Mounts", "Tasks/Create"]
        c.containers.remove("mnt1", force=True, container=fetched)
        del calls[:]
        with c.run("mnt2", "busybox", SpecOptions(args=["sh", "-c", "echo ok"])) as box:
            assert box.wait(timeout=30).code == 0 and box.output() == b"ok\n"
        # the record `create` returned serves the task's create and the cleanup
        assert "Snapshots/Mounts" not in calls and "Containers/Get" not in calls
        assert c.containers.list() == []


def test_an_image_run_again_reads_its_manifest_and_config_once(daemon, busybox, monkeypatch):
    """Blobs are named by their digest: the client keeps the JSON ones it read, so one image
    run again and again costs no Content.Read after the first (the image record is still
    asked each time: a tag may move). Each caller gets a dict of its own."""
    with Client(daemon.address) as c:
        calls = _record_calls(monkeypatch)
        first = c.images.resolve("busybox")
        assert calls.count("Content/Read") == 2  # the manifest, the config
        first.config["changed"] = "by the caller"
        del calls[:]
        again = c.images.resolve("busybox")
        with c.run("memo1", "busybox", SpecOptions(args=["true"])) as box:
            assert box.wait(timeout=30).code == 0
            # no output, so no temporary file was made for it
            assert (box.output(), box.errors()) == (b"", b"") and box._out.file is None
        assert "Content/Read" not in calls and calls.count("Images/Get") == 2
        assert "changed" not in again.config and again.manifest == first.manifest


def test_force_remove_falls_back_only_for_a_live_task(daemon, busybox, monkeypatch):
    """remove(force=True) tries Tasks.Delete first. Only a refusal for a live task
    (runtimed's FAILED_PRECONDITION, containerd's UNKNOWN) leads to looking the task up and
    killing it; any other error (UNAVAILABLE, a deadline) is raised as it came, the
    container left as it was."""
    from runtimed.errors import DeadlineExceeded

    with Client(daemon.address) as c:
        records = {}
        for name in ("live1", "live2"):
            records[name] = c.containers.create(name, "busybox", SpecOptions(args=["sleep", "1000"]))
            c.tasks.create(name, container=records[name])
            c.tasks.start(name)
        fail = {"Tasks/Delete": [("UNAVAILABLE", "shim not reachable"),
                                 ("DEADLINE_EXCEEDED", "Deadline Exceeded")]}
        calls = _record_calls(monkeypatch, fail)
        with pytest.raises(Unavailable, match="shim not reachable"):
            c.containers.remove("live1", force=True, container=records["live1"])
        with pytest.raises(DeadlineExceeded):
            c.containers.remove("live1", force=True, container=records["live1"])
        assert calls == ["Tasks/Delete", "Tasks/Delete"]  # not asked again, nothing killed
        assert c.tasks.get("live1").status == "RUNNING" and c.containers.get("live1")

        fail["Tasks/Delete"] = [("UNKNOWN", "cannot delete a running process")]  # containerd
        del calls[:]
        c.containers.remove("live1", force=True, container=records["live1"])
        assert calls[:3] == ["Tasks/Delete", "Tasks/Get", "Tasks/Wait"] and "Tasks/Kill" in calls
        del calls[:]
        c.containers.remove("live2", force=True, container=records["live2"])  # runtimed's refusal
        assert calls[:2] == ["Tasks/Delete", "Tasks/Get"] and "Tasks/Kill" in calls
        assert c.containers.list() == [] and c.tasks.list() == []


def test_wait_returns_when_something_outside_holds_the_output_open(daemon, busybox):
    """The end of a container kills every process in its pid namespace, so only a process
    outside it can keep its output open: here the test itself, holding the init's stdout
    (reopened through /proc). `wait()` (no timeout) still returns, with what was written,
    once the grace after the exit is over; it waited for EOF without a limit before."""
    import os

    with Client(daemon.address) as c:
        with c.run("held", "busybox", SpecOptions(args=["sh", "-c", "echo started; exec sleep 1000"])) as box:
            holder = os.open(f"/proc/{c.tasks.get('held').pid}/fd/1", os.O_WRONLY)
            try:
                for _ in range(600):  # the echo has reached the client
                    if box.output():
                        break
                    time.sleep(0.05)
                c.tasks.kill("held", 9)
                result = {}
                waiter = threading.Thread(target=lambda: result.update(status=box.wait()), daemon=True)
                waiter.start()
                waiter.join(120)
                assert not waiter.is_alive(), "wait() did not return while the output was held open"
                assert result["status"].code == 137 and box.output() == b"started\n"
            finally:
                os.close(holder)
        assert c.containers.list() == []
