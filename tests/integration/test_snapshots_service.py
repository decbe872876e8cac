"""Snapshots and Diff services over gRPC on a real runtimed: status codes, streamed List
with filters, events, Diff.Apply through every mount path (overlay upperdir, bind,
temporary mount) and its refusal of hostile layers, Diff.Diff into the content store."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time

import grpc
import pytest
from isal import igzip

from runtimed.api.containerd.events import snapshot_pb2
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.snapshots import mount as mountlib

MD = [("containerd-namespace", "default")]


def layer(*files: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_blob(channel, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    stub = content_pb2_grpc.ContentStub(channel)
    ref = f"test-{digest[-12:]}"
    reqs = [
        content_pb2.WriteContentRequest(action=content_pb2.WriteAction.WRITE, ref=ref,
                                        total=len(data), expected=digest, offset=0, data=data),
        content_pb2.WriteContentRequest(action=content_pb2.WriteAction.COMMIT, ref=ref,
                                        total=len(data), expected=digest, offset=len(data)),
    ]
    for _ in stub.Write(iter(reqs), metadata=MD):
        pass
    return digest


def apply(channel, data: bytes, mounts, media_type="application/vnd.oci.image.layer.v1.tar+gzip"):
    digest = put_blob(channel, data)
    stub = diff_pb2_grpc.DiffStub(channel)
    return stub.Apply(diff_pb2.ApplyRequest(
        diff=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=len(data)),
        mounts=mounts), metadata=MD)


def test_errors_map_to_containerd_codes(daemon):
    sn = snapshots_pb2_grpc.SnapshotsStub(daemon.channel())
    with pytest.raises(grpc.RpcError) as err:
        sn.Stat(pb.StatSnapshotRequest(snapshotter="overlayfs", key="nope"), metadata=MD)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    sn.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=MD)  # "" means overlayfs
    with pytest.raises(grpc.RpcError) as err:
        sn.Prepare(pb.PrepareSnapshotRequest(snapshotter="overlayfs", key="a"), metadata=MD)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    sn.Commit(pb.CommitSnapshotRequest(snapshotter="overlayfs", name="c", key="a"), metadata=MD)
    sn.View(pb.ViewSnapshotRequest(snapshotter="overlayfs", key="v", parent="c"), metadata=MD)
    with pytest.raises(grpc.RpcError) as err:
        sn.Remove(pb.RemoveSnapshotRequest(snapshotter="overlayfs", key="c"), metadata=MD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        sn.Prepare(pb.PrepareSnapshotRequest(snapshotter="btrfs", key="x"), metadata=MD)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_streams_with_filters_and_usage(daemon):
    sn = snapshots_pb2_grpc.SnapshotsStub(daemon.channel())
    for i in range(130):
        sn.Prepare(pb.PrepareSnapshotRequest(snapshotter="native", key=f"k{i:03d}",
                                             labels={"even": str(i % 2 == 0).lower()}),
                   metadata=MD)
    replies = list(sn.List(pb.ListSnapshotsRequest(snapshotter="native"), metadata=MD))
    assert len(replies) == 2  # streamed in batches
    assert sum(len(r.info) for r in replies) == 130
    even = [i.name for r in sn.List(pb.ListSnapshotsRequest(
        snapshotter="native", filters=['labels.even==true,kind==active']), metadata=MD)
        for i in r.info]
    assert len(even) == 65 and all(int(n[1:]) % 2 == 0 for n in even)
    usage = sn.Usage(pb.UsageRequest(snapshotter="native", key="k000"), metadata=MD)
    assert usage.inodes == 1


def test_events_published(daemon):
    ev = events_pb2_grpc.EventsStub(daemon.channel())
    stream = ev.Subscribe(events_pb2.SubscribeRequest(filters=['topic~="^/snapshot/"']))
    time.sleep(0.3)
    sn = snapshots_pb2_grpc.SnapshotsStub(daemon.channel())
    sn.Prepare(pb.PrepareSnapshotRequest(key="e1"), metadata=MD)
    sn.Commit(pb.CommitSnapshotRequest(name="e2", key="e1"), metadata=MD)
    sn.Remove(pb.RemoveSnapshotRequest(key="e2"), metadata=MD)
    got = [next(stream) for _ in range(3)]
    stream.cancel()
    assert [e.topic for e in got] == ["/snapshot/prepare", "/snapshot/commit", "/snapshot/remove"]
    commit = snapshot_pb2.SnapshotCommit()
    commit.ParseFromString(got[1].event.value)
    assert (commit.key, commit.name) == ("e1", "e2")
    assert got[1].event.type_url == "containerd.events.SnapshotCommit"


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_apply_then_diff_round_trip(daemon, snapshotter):
    ch = daemon.channel()
    sn = snapshots_pb2_grpc.SnapshotsStub(ch)
    base = layer(("etc/hostname", b"base\n"), ("bin/tool", b"x" * 100_000))
    mounts = sn.Prepare(pb.PrepareSnapshotRequest(snapshotter=snapshotter, key="l1"),
                        metadata=MD).mounts
    applied = apply(ch, igzip.compress(base), mounts).applied
    assert applied.digest == "sha256:" + hashlib.sha256(base).hexdigest()
    assert applied.media_type == "application/vnd.oci.image.layer.v1.tar"
    sn.Commit(pb.CommitSnapshotRequest(snapshotter=snapshotter, name="base", key="l1"), metadata=MD)

    top = sn.Prepare(pb.PrepareSnapshotRequest(snapshotter=snapshotter, key="l2", parent="base"),
                     metadata=MD).mounts
    wh = io.BytesIO()
    with tarfile.open(fileobj=wh, mode="w") as tf:
        tf.addfile(tarfile.TarInfo("bin/.wh.tool"))
        info = tarfile.TarInfo("new")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"new"))
    apply(ch, wh.getvalue(), top, "application/vnd.oci.image.layer.v1.tar")
    lower = sn.View(pb.ViewSnapshotRequest(snapshotter=snapshotter, key="base-view",
                                           parent="base"), metadata=MD).mounts
    diff = diff_pb2_grpc.DiffStub(ch).Diff(diff_pb2.DiffRequest(
        left=lower, right=top, media_type="application/vnd.oci.image.layer.v1.tar+zstd",
        labels={"x": "y"}), metadata=MD).diff
    assert diff.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    info = content_pb2_grpc.ContentStub(ch).Info(content_pb2.InfoRequest(digest=diff.digest),
                                                 metadata=MD).info
    assert info.labels["x"] == "y"
    reader = content_pb2_grpc.ContentStub(ch).Read(content_pb2.ReadContentRequest(
        digest=diff.digest), metadata=MD)
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b"".join(r.data for r in reader))).read()
    assert info.labels["containerd.io/uncompressed"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
    assert "new" in names and "bin/.wh.tool" in names and "etc/hostname" not in names
    # against nothing (no left mounts) the right side is mounted read-only and walked whole:
    # for overlay, its upperdir becomes the top lowerdir of a read-only overlay
    whole = diff_pb2_grpc.DiffStub(ch).Diff(diff_pb2.DiffRequest(
        right=top, media_type="application/vnd.oci.image.layer.v1.tar"), metadata=MD).diff
    reader = content_pb2_grpc.ContentStub(ch).Read(content_pb2.ReadContentRequest(
        digest=whole.digest), metadata=MD)
    flat = tarfile.open(fileobj=io.BytesIO(b"".join(r.data for r in reader)))
    assert sorted(n for n in flat.getnames() if not n.endswith("/")) == [
        "bin", "etc", "etc/hostname", "new"]
    assert not [p for p in mountlib.mountpoints() if p.startswith(str(daemon.base))]


def test_apply_through_a_temporary_mount_and_hostile_layers(daemon, tmp_path):
    ch = daemon.channel()
    sn = snapshots_pb2_grpc.SnapshotsStub(ch)
    sn.Prepare(pb.PrepareSnapshotRequest(key="t1"), metadata=MD)
    sn.Commit(pb.CommitSnapshotRequest(name="t-base", key="t1"), metadata=MD)
    sn.Prepare(pb.PrepareSnapshotRequest(key="t2", parent="t-base"), metadata=MD)
    # an overlay mount list with an extra option the fast path does not take: mounted
    (m,) = sn.Mounts(pb.MountsRequest(key="t2"), metadata=MD).mounts
    m2 = type(m)(type="overlay", source="overlay", options=list(m.options) + ["nosuid"])
    apply(ch, layer(("via-mount", b"1")), [m2], "application/vnd.oci.image.layer.v1.tar")
    tmpmounts = daemon.root / "tmpmounts"
    # no temporary mount left (.staged holds layers staged at their commit: diff/staging.py)
    assert [e for e in os.listdir(tmpmounts) if e != ".staged"] == []
    assert not [p for p in mountlib.mountpoints() if p.startswith(str(daemon.root))]

    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    hostile = io.BytesIO()
    with tarfile.open(fileobj=hostile, mode="w") as tf:
        link = tarfile.TarInfo("esc")
        link.type, link.linkname = tarfile.SYMTYPE, str(sentinel)
        tf.addfile(link)
        info = tarfile.TarInfo("esc/pwned")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(grpc.RpcError) as err:
        apply(ch, hostile.getvalue(), [m2], "application/vnd.oci.image.layer.v1.tar")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert os.listdir(sentinel) == []
    assert [e for e in os.listdir(tmpmounts) if e != ".staged"] == []


def test_cleanup_rpc_and_namespace_in_use(daemon):
    ch = daemon.channel()
    sn = snapshots_pb2_grpc.SnapshotsStub(ch)
    other = [("containerd-namespace", "team")]
    sn.Prepare(pb.PrepareSnapshotRequest(key="held"), metadata=other)
    # a snapshot keeps its namespace (created implicitly) from being deleted
    refused = daemon.ctr("namespaces", "rm", "team", check=False)
    assert refused.returncode != 0
    assert "team" in daemon.ctr("namespaces", "ls", "-q").stdout.split()
    sn.Remove(pb.RemoveSnapshotRequest(key="held"), metadata=other)
    daemon.ctr("namespaces", "rm", "team")
    # Cleanup removes trees no record names (as a crash between steps would leave)
    orphan = daemon.root / "snapshots" / "overlayfs" / "snapshots" / "new-orphan"
    (orphan / "fs").mkdir(parents=True)
    sn.Cleanup(pb.CleanupRequest(snapshotter="overlayfs"), metadata=MD)
    assert not orphan.exists()
