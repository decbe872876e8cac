"""What a kill -9 can leave behind is repaired by the next start: blob files no namespace
references (a crash between rename and metadata commit) and ingest directories without
an ingest record go; committed content and resumable ingests stay."""

from __future__ import annotations

import hashlib
import time

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb
from runtimed.api.containerd.services.content.v1 import content_pb2_grpc

MD = [("containerd-namespace", "default")]


def test_restart_after_kill9_sweeps_leftovers_keeps_content(daemon):
    kept = b"committed before the crash"
    kept_digest = "sha256:" + hashlib.sha256(kept).hexdigest()
    with daemon.channel() as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        # a GC root: unreferenced content is collected, as in containerd
        commit = pb.WriteContentRequest(action=pb.COMMIT, ref="kept", data=kept, expected=kept_digest,
                                        labels={"containerd.io/gc.root": "test"})
        assert next(stub.Write(iter([commit]), metadata=MD)).digest == kept_digest
        partial = pb.WriteContentRequest(action=pb.WRITE, ref="partial", data=b"half", total=8)
        next(stub.Write(iter([partial]), metadata=MD))
    daemon.kill9()

    blobs = daemon.root / "content" / "blobs" / "sha256"
    stray_blob = blobs / hashlib.sha256(b"renamed, never recorded").hexdigest()
    stray_blob.write_bytes(b"renamed, never recorded")
    stray_ingest = daemon.root / "content" / "ingest" / ("f" * 64)
    stray_ingest.mkdir()
    (stray_ingest / "data").write_bytes(b"orphan")

    daemon.start()
    deadline = time.monotonic() + 10
    while (stray_blob.exists() or stray_ingest.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stray_blob.exists() and not stray_ingest.exists()
    with daemon.channel() as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        data = b"".join(r.data for r in stub.Read(pb.ReadContentRequest(digest=kept_digest), metadata=MD))
        assert data == kept
        st = stub.Status(pb.StatusRequest(ref="partial"), metadata=MD).status
        assert (st.offset, st.total) == (4, 8)
