"""A ~200 MB archive through the Archives service: streamed, so the daemon's memory stays
flat, and verified end to end (every layer digest checked on the way in and out)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runtimed.api.images.v1 import archive_pb2, archive_pb2_grpc
from tests import testimages

MD = [("containerd-namespace", "default")]


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("images"), large=True)["large"]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_import_export_streams(daemon, large, tmp_path):
    size = large.path.stat().st_size
    assert size > 190 << 20
    pid = daemon.proc.pid
    before = peak_rss_mb(pid)

    def chunks():
        yield archive_pb2.ImportRequest(options=archive_pb2.ImportOptions())
        with open(large.path, "rb") as f:
            while data := f.read(1 << 20):
                yield archive_pb2.ImportRequest(data=data)

    started = time.monotonic()
    with daemon.channel() as channel:
        stub = archive_pb2_grpc.ArchivesStub(channel)
        replies = list(stub.Import(chunks(), metadata=MD, timeout=300))
        took = time.monotonic() - started
        result = replies[-1].result
        assert [(i.name, i.target.digest) for i in result.images] == [(large.name, large.target["digest"])]
        reads = [r.progress.offset for r in replies[:-1] if r.progress.action == "read"]
        assert len(reads) > 10 and reads == sorted(reads) and reads[-1] == size
        for layer in large.layers:
            assert (daemon.root / "content/blobs/sha256" / layer.split(":")[1]).stat().st_size > 40 << 20

        out = tmp_path / "export.tar"
        with open(out, "wb") as f:
            for reply in stub.Export(archive_pb2.ExportRequest(names=[large.name]), metadata=MD,
                                     timeout=300):
                f.write(reply.data)
    grown = peak_rss_mb(pid) - before
    print(f"\nimport of {size / 2**20:.0f} MB: {took:.1f}s ({size / 2**20 / took:.0f} MB/s); "
          f"daemon peak RSS grew {grown:.0f} MB")
    assert grown < 100, f"daemon peak RSS grew by {grown:.0f} MB: the archive was buffered"
    assert out.stat().st_size >= size - (1 << 20)
