"""Resource faults: a root on a small tmpfs that fills up, and a daemon with few file
descriptors. Writes fail with RESOURCE_EXHAUSTED (or FAILED_PRECONDITION), nothing
half-written becomes visible, and runtimed keeps serving and recovers once there is room."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import grpc
import pytest

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from tests.conftest import DaemonProcess, release_cgroup
from tests.torture import stats
from tests.torture.conftest import remove_namespace_cgroups, stop_and_check
from tests.torture.helpers import blob_path, corrupt_blobs, md, metadata_problems, version

CLEAR = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
NS = "trt-full"


def write_blob(channel, data: bytes, ref: str, commit: bool = True) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    chunks = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    requests = [content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, data=c,
                                                offset=i << 20, total=len(data),
                                                expected=digest)
                for i, c in enumerate(chunks)]
    if commit:
        requests.append(content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT, ref=ref, offset=len(data), total=len(data),
            expected=digest))
    stub = content_pb2_grpc.ContentStub(channel)
    for _ in stub.Write(iter(requests), metadata=md(NS), timeout=60):
        pass
    return digest


@pytest.fixture
def small_root():
    """A runtimed whose root is a 24 MiB tmpfs (state dir and log stay outside)."""
    base = Path(tempfile.mkdtemp(prefix="rtt-", dir="/tmp"))
    (base / "root").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0711", "tmpfs",
                    str(base / "root")], check=True)
    proc = DaemonProcess(base)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        subprocess.run(["umount", str(base / "root")], check=True)
        remove_namespace_cgroups(NS)
        problems = stop_and_check(proc)
        assert not problems, problems


def fill(root: Path, leave: int, name: str = "filler") -> Path:
    """A file taking all the free space of `root` but `leave` bytes."""
    st = os.statvfs(root)
    filler = root / name
    with open(filler, "wb") as f:
        remaining = st.f_bavail * st.f_frsize - leave
        block = b"\0" * (1 << 20)
        while remaining > 0:
            remaining -= f.write(block[:remaining])
    return filler


def test_a_full_root_refuses_writes_cleanly_and_recovers(small_root, busybox_archive):
    d = small_root
    with d.channel() as channel:
        write_blob(channel, os.urandom(1000), "warm")  # the namespace and tables exist
        filler = fill(d.root, leave=256 << 10)
        data = os.urandom(3 << 20)
        with pytest.raises(grpc.RpcError) as info:
            write_blob(channel, data, "big")
        stats.record("inputs")
        assert info.value.code() in CLEAR, info.value
        assert "space" in info.value.details()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert not blob_path(d.root, digest).exists()
        with pytest.raises(grpc.RpcError) as info:
            content_pb2_grpc.ContentStub(channel).Info(content_pb2.InfoRequest(digest=digest),
                                                       metadata=md(NS))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        imported = d.ctr("images", "import", busybox_archive, namespace=NS, check=False)
        stats.record("inputs")
        assert imported.returncode != 0 and "space" in imported.stderr, imported.stderr
        images = images_pb2_grpc.ImagesStub(channel)
        assert list(images.List(images_pb2.ListImagesRequest(), metadata=md(NS)).images) == []

        # metadata writes too: sqlite's "database or disk is full" is a clear refusal
        fill(d.root, leave=0, name="filler2")
        container = containers_pb2.Container(id="c1", snapshotter="overlayfs")
        container.runtime.name = "io.containerd.runc.v2"
        container.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
        container.spec.value = b"{}"
        containers = containers_pb2_grpc.ContainersStub(channel)
        try:
            containers.Create(containers_pb2.CreateContainerRequest(container=container),
                              metadata=md(NS))
        except grpc.RpcError as exc:  # small rows may still fit in sqlite's free pages
            assert exc.code() in CLEAR, exc
        stats.record("inputs")

        assert version(channel)  # still serving, reads work
        assert metadata_problems(channel, d.root) == []
        assert corrupt_blobs(d.root) == []

        filler.unlink()
        (d.root / "filler2").unlink()
        assert write_blob(channel, data, "big") == digest  # resumes or starts over
        d.ctr("images", "import", busybox_archive, namespace=NS)
        assert metadata_problems(channel, d.root) == []
        assert corrupt_blobs(d.root) == []


def test_a_write_failing_after_its_answer_leaves_an_ingest_that_resumes(small_root):
    """Content.Write answers a quick WRITE before its bytes reach the file: when the disk
    fills under the second MiB, the stream still fails with a clear status, and the ingest
    holds exactly the bytes that reached the file: once there is room, a STAT reports them
    and their digest, and the client resumes from there."""
    d = small_root
    with d.channel() as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        write_blob(channel, os.urandom(1000), "warm")
        filler = fill(d.root, leave=(3 << 20) // 2)
        data = os.urandom(3 << 20)
        with pytest.raises(grpc.RpcError) as info:
            write_blob(channel, data, "half", commit=False)
        assert info.value.code() in CLEAR, info.value
        assert "space" in info.value.details()

        def stat():
            request = content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="half")
            return next(iter(stub.Write(iter([request]), metadata=md(NS), timeout=30)))

        filler.unlink()  # (a STAT writes the ingest's row again)
        status = stat()
        assert 1 << 20 <= status.offset < len(data)  # the first MiB and part of the second
        assert status.digest == "sha256:" + hashlib.sha256(data[:status.offset]).hexdigest()
        rest = [content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref="half",
                                                offset=status.offset, data=data[status.offset:]),
                content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref="half",
                                                offset=len(data), total=len(data))]
        replies = list(stub.Write(iter(rest), metadata=md(NS), timeout=30))
        assert replies[-1].digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert corrupt_blobs(d.root) == []


class LowFdDaemon(DaemonProcess):
    """runtimed started under `prlimit --nofile=N`."""

    def __init__(self, base: Path, nofile: int):
        super().__init__(base)
        self.nofile = nofile

    @property
    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().command]


@pytest.fixture
def low_fds():
    proc = LowFdDaemon(Path(tempfile.mkdtemp(prefix="rtt-", dir="/tmp")), 64)
    proc.start()
    yield proc
    problems = stop_and_check(proc)
    assert not problems, problems


def test_too_many_open_files_is_a_clear_error(low_fds):
    """60 writes held open at once against 64 descriptors: some fail, clearly."""
    d = low_fds
    codes: list[grpc.StatusCode] = []
    release = threading.Event()
    lock = threading.Lock()

    def held_write(n: int) -> None:
        data = os.urandom(4096)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()

        def requests():
            yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=f"w{n}",
                                                  data=data, total=len(data), expected=digest)
            release.wait(30)
            yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=f"w{n}",
                                                  offset=len(data), total=len(data),
                                                  expected=digest)

        code = grpc.StatusCode.OK
        try:
            with d.channel() as channel:  # a connection each: a descriptor each
                for _ in content_pb2_grpc.ContentStub(channel).Write(
                        requests(), metadata=md(NS), timeout=40):
                    pass
        except grpc.RpcError as exc:
            code = exc.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=held_write, args=(n,)) for n in range(60)]
    for t in threads:
        t.start()
    threading.Timer(5, release.set).start()
    for t in threads:
        t.join(60)
    stats.record("inputs", len(codes))
    assert d.proc.poll() is None, "runtimed died:\n" + d.log_text()
    bad = [c for c in codes if c not in {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                         grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED}]
    assert not bad, codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) != {grpc.StatusCode.OK}, "the descriptor limit was never reached"
    assert len(codes) == 60
    with d.channel() as channel:
        assert version(channel)
        assert corrupt_blobs(d.root) == []
        write_blob(channel, os.urandom(1000), "after")  # serving normally again


PIDS_ROOT = Path("/sys/fs/cgroup/pids")


@pytest.mark.skipif(not (PIDS_ROOT / "cgroup.procs").exists(),
                    reason="needs the cgroup v1 pids hierarchy (this machine's layout)")
def test_fork_failures_are_clear_errors(daemon, ns, busybox_archive):
    """The process that forks shims gets no new pids: creating a task fails clearly,
    runtimed keeps serving, and the next create works once pids are free."""
    from tests import testimages
    from tests.conftest import processes_mentioning

    image = testimages.BUSYBOX_NAME
    daemon.ctr("images", "import", busybox_archive, namespace=ns)
    daemon.ctr("run", "--rm", image, "first", "true", namespace=ns)  # the zygote is up
    forkers = processes_mentioning(str(daemon.state / "shim-zygote.sock"))
    assert forkers
    cgroup = PIDS_ROOT / f"{ns}-nofork"
    cgroup.mkdir()
    try:
        for pid in forkers:
            # the zygote and the shims it forked (they keep its command line): the first
            # run's shim may have exited since, and been reaped by the zygote at once
            with contextlib.suppress(ProcessLookupError):
                (cgroup / "cgroup.procs").write_text(str(pid))
        (cgroup / "pids.max").write_text((cgroup / "pids.current").read_text().strip())
        failed = daemon.ctr("run", "-d", image, "starved", "sleep", "1000", namespace=ns,
                            check=False)
        stats.record("inputs")
        assert failed.returncode != 0
        assert "Resource temporarily unavailable" in failed.stderr, failed.stderr
        assert "internal" not in failed.stderr.lower() and "unknown:" not in failed.stderr
        assert daemon.proc.poll() is None
        assert daemon.ctr("tasks", "ls", "-q", namespace=ns).stdout.split() == []
        assert not (daemon.state / "tasks" / ns / "starved").exists()
        (cgroup / "pids.max").write_text("max")
        daemon.ctr("containers", "rm", "starved", namespace=ns)
        out = daemon.ctr("run", "--rm", image, "fed", "echo", "fed", namespace=ns).stdout
        assert out == "fed\n"
    finally:
        release_cgroup(cgroup)
