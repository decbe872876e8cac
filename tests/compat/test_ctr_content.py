"""The real `ctr content ...` and raw gRPC Write streams against a real runtimed."""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import threading
import time

import grpc
import pytest

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb
from runtimed.api.containerd.services.content.v1 import content_pb2_grpc
from tests import testimages
from tests.registry_server import registry  # noqa: F401 - fixture


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class WriteStream:
    """A bidi Write stream driven one request at a time, as containerd's remote writer does."""

    def __init__(self, channel, namespace: str = "default", lease: str | None = None):
        self._requests: queue.Queue = queue.Queue()
        metadata = [("containerd-namespace", namespace)]
        if lease:
            metadata.append(("containerd-lease", lease))
        stub = content_pb2_grpc.ContentStub(channel)
        self._responses = stub.Write(iter(self._requests.get, None), metadata=metadata)

    def send(self, **fields) -> pb.WriteContentResponse:
        self._requests.put(pb.WriteContentRequest(**fields))
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


def blob_files(daemon) -> list[str]:
    return sorted(os.listdir(daemon.root / "content" / "blobs" / "sha256"))


def test_ingest_ls_get_label_rm(daemon):
    data = os.urandom(300_000)
    dgst = digest_of(data)
    daemon.ctr("content", "ingest", "--expected-size", str(len(data)), "--expected-digest", dgst,
               "my-ref", input=data)
    listing = daemon.ctr("content", "ls").stdout
    assert dgst in listing and "my-ref" not in listing
    got = daemon.ctr("content", "get", dgst, input=b"").stdout
    assert got == data
    daemon.ctr("content", "label", dgst, "color=blue")
    assert "color=blue" in daemon.ctr("content", "ls").stdout
    assert dgst not in daemon.ctr("content", "ls", namespace="other").stdout
    daemon.ctr("content", "rm", dgst)
    assert dgst not in daemon.ctr("content", "ls").stdout
    missing = daemon.ctr("content", "get", dgst, check=False, input=b"")
    assert missing.returncode != 0 and b"not found" in missing.stderr


def test_digest_mismatch_refused_nothing_visible(daemon):
    data = b"the real bytes" * 1000
    wrong = digest_of(b"something else")
    result = daemon.ctr("content", "ingest", "--expected-digest", wrong, "bad-ref",
                        input=data, check=False)
    assert result.returncode != 0
    assert b"unexpected commit digest" in result.stderr
    assert daemon.ctr("content", "ls", "-q").stdout.strip() == ""
    assert blob_files(daemon) == []
    with daemon.channel() as channel:
        stream = WriteStream(channel)
        stream.send(action=pb.STAT, ref="bad-2")
        with pytest.raises(grpc.RpcError) as err:
            stream.send(action=pb.COMMIT, ref="bad-2", data=data, total=len(data), expected=wrong)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stream = WriteStream(channel)
        stream.send(action=pb.STAT, ref="bad-3")
        with pytest.raises(grpc.RpcError) as err:
            stream.send(action=pb.COMMIT, ref="bad-3", data=data, total=len(data) + 1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert daemon.ctr("content", "ls", "-q").stdout.strip() == ""
    assert blob_files(daemon) == []


def test_two_writers_on_one_ref(daemon):
    with daemon.channel() as channel:
        first = WriteStream(channel)
        assert first.send(action=pb.STAT, ref="shared-ref", total=10).offset == 0
        second = WriteStream(channel)
        with pytest.raises(grpc.RpcError) as err:
            second.send(action=pb.STAT, ref="shared-ref")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "locked" in err.value.details()
        reply = first.send(action=pb.COMMIT, ref="shared-ref", data=b"0123456789", total=10)
        assert reply.digest == digest_of(b"0123456789")
        first.close()


def test_a_digest_committed_meanwhile_ends_a_later_message_naming_it(daemon):
    """An `expected` digest the namespace got since the stream began ends the stream with
    ALREADY_EXISTS at the WRITE or COMMIT naming it, and drops that stream's ingest."""
    data = b"0123456789" * 50
    md = [("containerd-namespace", "default")]
    with daemon.channel() as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        writing, committing = WriteStream(channel), WriteStream(channel)
        assert writing.send(action=pb.WRITE, ref="late-write", data=data[:100]).offset == 100
        assert committing.send(action=pb.WRITE, ref="late-commit", data=data).offset == len(data)
        other = WriteStream(channel)
        other.send(action=pb.COMMIT, ref="first", data=data, total=len(data),
                   expected=digest_of(data))
        other.close()
        with pytest.raises(grpc.RpcError) as err:
            writing.send(action=pb.WRITE, ref="late-write", offset=100, data=data[100:],
                         expected=digest_of(data))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as err:
            committing.send(action=pb.COMMIT, ref="late-commit", offset=len(data),
                            total=len(data), expected=digest_of(data))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        statuses = stub.ListStatuses(pb.ListStatusesRequest(), metadata=md).statuses
        assert [s.ref for s in statuses] == []
        assert stub.Info(pb.InfoRequest(digest=digest_of(data)), metadata=md).info.size == len(data)


def test_a_present_digest_in_the_first_message_drops_an_earlier_streams_ingest(daemon):
    """containerd aborts the ref before answering ALREADY_EXISTS for an `expected` digest
    the namespace has: an ingest an interrupted stream left under that ref goes too (it
    stayed, listed, until it expired)."""
    data = b"first message " * 40
    md = [("containerd-namespace", "default")]
    with daemon.channel() as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        interrupted = WriteStream(channel)
        assert interrupted.send(action=pb.WRITE, ref="left", data=data[:100]).offset == 100
        interrupted.close()
        committer = WriteStream(channel)
        committer.send(action=pb.COMMIT, ref="other", data=data, total=len(data),
                       expected=digest_of(data))
        committer.close()
        assert [s.ref for s in stub.ListStatuses(pb.ListStatusesRequest(),
                                                 metadata=md).statuses] == ["left"]
        for _ in range(50):  # UNAVAILABLE while the cancelled stream still holds the ref
            again = WriteStream(channel)
            with pytest.raises(grpc.RpcError) as err:
                again.send(action=pb.STAT, ref="left", expected=digest_of(data))
            again.close()
            if err.value.code() != grpc.StatusCode.UNAVAILABLE:
                break
            time.sleep(0.1)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert stub.ListStatuses(pb.ListStatusesRequest(), metadata=md).statuses == []


def test_write_protocol_offsets_and_already_exists(daemon):
    data = b"abcdefghij" * 100
    with daemon.channel() as channel:
        s = WriteStream(channel)
        assert s.send(action=pb.STAT, ref="proto", total=len(data)).total == len(data)
        assert s.send(action=pb.WRITE, ref="proto", data=data[:400]).offset == 400
        with pytest.raises(grpc.RpcError) as err:
            s.send(action=pb.WRITE, ref="proto", offset=100, data=data[100:200])
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        # the failed stream released the ref; a new one resumes at 400
        s = WriteStream(channel)
        assert s.send(action=pb.STAT, ref="proto").offset == 400
        # offset 0 on a non-empty ingest starts it over
        assert s.send(action=pb.WRITE, ref="proto", offset=0, data=data[:10]).offset == 10
        assert s.send(action=pb.WRITE, ref="proto", offset=10, data=data[10:]).offset == len(data)
        reply = s.send(action=pb.COMMIT, ref="proto", offset=len(data), total=len(data),
                       expected=digest_of(data), labels={"k": "v"})
        assert (reply.action, reply.digest, reply.offset) == (pb.COMMIT, digest_of(data), len(data))
        s.close()
        again = WriteStream(channel)
        with pytest.raises(grpc.RpcError) as err:
            again.send(action=pb.STAT, ref="proto2", expected=digest_of(data))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        stub = content_pb2_grpc.ContentStub(channel)
        md = [("containerd-namespace", "default")]
        info = stub.Info(pb.InfoRequest(digest=digest_of(data)), metadata=md).info
        assert (info.size, dict(info.labels)) == (len(data), {"k": "v"})
        chunks = list(stub.Read(pb.ReadContentRequest(digest=digest_of(data), offset=5, size=20),
                                metadata=md))
        assert b"".join(c.data for c in chunks) == data[5:25] and chunks[0].offset == 5
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Read(pb.ReadContentRequest(digest=digest_of(data), offset=len(data) + 1),
                           metadata=md))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(pb.InfoRequest(digest="sha256:nope"), metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_interrupted_write_resumes_with_ctr(daemon, tmp_path):
    """A write cut off half way shows in `ctr content active`; `ctr content ingest` of the
    same ref resumes: it skips the bytes already there (here garbage in its input proves
    it did not rewrite them) and the blob ends correct."""
    data = os.urandom(2_000_000)
    dgst = digest_of(data)
    half = 1_200_000
    with daemon.channel() as channel:
        s = WriteStream(channel)
        s.send(action=pb.STAT, ref="fetch-ref", total=len(data), expected=dgst)
        for start in range(0, half, 1 << 18):
            s.send(action=pb.WRITE, ref="fetch-ref", offset=start, data=data[start:min(start + (1 << 18), half)])
        s.close()
    active = daemon.ctr("content", "active").stdout
    assert "fetch-ref" in active
    tampered = tmp_path / "input"
    tampered.write_bytes(b"\0" * half + data[half:])
    with open(tampered, "rb") as stdin:  # a file: ctr seeks past what the store has
        subprocess.run(
            ["ctr", "-a", daemon.address, "content", "ingest", "--expected-size", str(len(data)),
             "--expected-digest", dgst, "fetch-ref"],
            stdin=stdin, check=True, capture_output=True, timeout=60,
        )
    assert daemon.ctr("content", "get", dgst, input=b"").stdout == data
    assert "fetch-ref" not in daemon.ctr("content", "active").stdout


def test_list_and_statuses_over_grpc(daemon):
    with daemon.channel() as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        md = [("containerd-namespace", "lists")]
        blobs = [f"blob {i}".encode() for i in range(150)]
        for i, blob in enumerate(blobs):
            s = WriteStream(channel, "lists")
            s.send(action=pb.COMMIT, ref=f"r{i}", data=blob, labels={"n": str(i % 2)})
            s.close()
        batches = list(stub.List(pb.ListContentRequest(), metadata=md))
        assert [len(b.info) for b in batches] == [100, 50]
        odd = list(stub.List(pb.ListContentRequest(filters=["labels.n==1"]), metadata=md))
        assert sum(len(b.info) for b in odd) == 75
        s = WriteStream(channel, "lists")
        s.send(action=pb.WRITE, ref="pending-a", data=b"xyz", total=9)
        s.close()
        st = stub.Status(pb.StatusRequest(ref="pending-a"), metadata=md).status
        assert (st.ref, st.offset, st.total) == ("pending-a", 3, 9)
        listed = stub.ListStatuses(pb.ListStatusesRequest(filters=['ref~="^pending"']), metadata=md)
        assert [x.ref for x in listed.statuses] == ["pending-a"]
        stub.Abort(pb.AbortRequest(ref="pending-a"), metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            stub.Status(pb.StatusRequest(ref="pending-a"), metadata=md)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        upd = stub.Update(pb.UpdateRequest(
            info=pb.Info(digest=digest_of(blobs[0]), labels={"n": "", "x": "1"}),
            update_mask={"paths": ["labels.x"]}), metadata=md).info
        assert dict(upd.labels) == {"n": "0", "x": "1"}


def test_kill9_during_large_write_then_resume(daemon):
    """~200 MB written through Content.Write; runtimed is killed -9 half way, restarted,
    and the same ref resumes. The blob ends correct; no partial blob is ever visible."""
    size = 200 * (1 << 20)
    chunk = 1 << 20
    seed = hashlib.sha256(b"runtimed-large").digest()
    block = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(256)) * 128
    data_chunk = [block[(i * 4099) % len(block):] + block[:(i * 4099) % len(block)]
                  for i in range(size // chunk)]
    dgst_hash = hashlib.sha256()
    for c in data_chunk:
        dgst_hash.update(c)
    dgst = "sha256:" + dgst_hash.hexdigest()
    visible: list[str] = []
    stop = threading.Event()

    def watch():
        blobs = daemon.root / "content" / "blobs" / "sha256"
        while not stop.is_set():
            if blobs.is_dir() and os.listdir(blobs):
                visible.extend(os.listdir(blobs))
            stop.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with daemon.channel() as channel:
            s = WriteStream(channel)
            s.send(action=pb.STAT, ref="large", total=size, expected=dgst)
            for i in range(100):
                s.send(action=pb.WRITE, ref="large", offset=i * chunk, data=data_chunk[i])
            daemon.kill9()
            with pytest.raises(grpc.RpcError):
                s.send(action=pb.WRITE, ref="large", offset=100 * chunk, data=data_chunk[100])
        assert visible == []
        daemon.start()
        assert daemon.ctr("content", "ls", "-q").stdout.strip() == ""
        with daemon.channel() as channel:
            s = WriteStream(channel)
            offset = s.send(action=pb.STAT, ref="large", total=size, expected=dgst).offset
            assert 0 < offset <= 100 * chunk
            assert visible == []
            first = offset // chunk
            s.send(action=pb.WRITE, ref="large", offset=offset,
                   data=data_chunk[first][offset % chunk:])
            for i in range(first + 1, size // chunk - 1):
                s.send(action=pb.WRITE, ref="large", offset=i * chunk, data=data_chunk[i])
            assert visible == []
            last = size // chunk - 1
            reply = s.send(action=pb.COMMIT, ref="large", offset=last * chunk,
                           data=data_chunk[last], total=size, expected=dgst)
            assert reply.digest == dgst and reply.offset == size
            s.close()
            stub = content_pb2_grpc.ContentStub(channel)
            md = [("containerd-namespace", "default")]
            read_back = hashlib.sha256()
            for part in stub.Read(pb.ReadContentRequest(digest=dgst), metadata=md):
                read_back.update(part.data)
            assert "sha256:" + read_back.hexdigest() == dgst
    finally:
        stop.set()
        watcher.join()
    assert visible and set(visible) == {dgst.split(":")[1]}


def test_push_then_fetch_resumes_partial_ingest(daemon, registry, tmp_path):  # noqa: F811
    """`ctr images push` reads through Content.Info/Read; `ctr content fetch` writes through
    Content.Write with containerd's ref keys (`layer-<digest>`). A partial ingest already
    under the layer's ref (an earlier fetch cut off) is resumed, and the blob ends correct."""
    images = testimages.build(tmp_path / "img")
    busybox = images["busybox"]
    remote = f"{registry.host}/test/busybox:latest"
    daemon.ctr("images", "import", "--no-unpack", busybox.archive, namespace="src")
    daemon.ctr("images", "push", "--plain-http", remote, busybox.name, namespace="src")
    layer = busybox.layers[0]
    data = daemon.ctr("content", "get", layer, namespace="src", input=b"").stdout
    with daemon.channel() as channel:
        s = WriteStream(channel, "dst")
        s.send(action=pb.STAT, ref=f"layer-{layer}", total=len(data), expected=layer)
        s.send(action=pb.WRITE, ref=f"layer-{layer}", data=data[: len(data) // 2])
        s.close()
    assert f"layer-{layer}" in daemon.ctr("content", "active", namespace="dst").stdout
    daemon.ctr("content", "fetch", "--plain-http", remote, namespace="dst")
    fetched = set(daemon.ctr("content", "ls", "-q", namespace="dst").stdout.split())
    assert {busybox.manifests[0], busybox.configs[0], layer} <= fetched
    assert daemon.ctr("content", "get", layer, namespace="dst", input=b"").stdout == data
    assert daemon.ctr("content", "active", namespace="dst").stdout.strip().count("\n") == 0
