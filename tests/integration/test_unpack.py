"""runtimed's own Unpacker, driven by an Archives import with `unpack`: the chain is
committed under chain IDs with containerd's labels, the host platform is chosen from an
index, existing snapshots are reused, and a layer whose content contradicts the config's
diff ID is refused without leaving a snapshot behind."""

from __future__ import annotations

import os

import grpc
import pytest

from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from runtimed.api.images.v1 import archive_pb2, archive_pb2_grpc
from runtimed.images.unpack import chain_ids
from runtimed.snapshots import mount as mountlib
from runtimed.snapshots.mount import Mount
from tests import testimages

MD = [("containerd-namespace", "default")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("images"))


def run_import(channel, path, **options):
    data = open(path, "rb").read()

    def requests():
        yield archive_pb2.ImportRequest(options=archive_pb2.ImportOptions(unpack=True, **options))
        for i in range(0, len(data), 1 << 20):
            yield archive_pb2.ImportRequest(data=data[i:i + (1 << 20)])

    return list(archive_pb2_grpc.ArchivesStub(channel).Import(requests(), metadata=MD, timeout=60))


def infos(channel, snapshotter="overlayfs") -> dict[str, pb.Info]:
    stub = snapshots_pb2_grpc.SnapshotsStub(channel)
    return {i.name: i for r in stub.List(pb.ListSnapshotsRequest(snapshotter=snapshotter),
                                         metadata=MD) for i in r.info}


def labels(channel, digest: str) -> dict[str, str]:
    stub = content_pb2_grpc.ContentStub(channel)
    return dict(stub.Info(content_pb2.InfoRequest(digest=digest), metadata=MD).info.labels)


def test_import_with_unpack_commits_the_chain(daemon, images):
    ch = daemon.channel()
    multi = images["multilayer"]
    replies = run_import(ch, multi.path)
    assert any(r.progress.action == "unpack" for r in replies if r.WhichOneof("response") == "progress")
    chain = chain_ids(multi.diff_ids)
    found = infos(ch)
    assert set(found) == set(chain)
    for i, chain_id in enumerate(chain):
        assert found[chain_id].kind == pb.COMMITTED
        assert found[chain_id].parent == (chain[i - 1] if i else "")
        assert found[chain_id].labels["containerd.io/snapshot.ref"] == chain_id
    assert labels(ch, multi.configs[0])["containerd.io/gc.ref.snapshot.overlayfs"] == chain[-1]
    for digest, diff_id in zip(multi.layers, multi.diff_ids, strict=True):
        assert labels(ch, digest)["containerd.io/uncompressed"] == diff_id
    # the whiteouts of the upper layers are overlay whiteouts in their upper directories
    uppers = daemon.root / "snapshots" / "overlayfs" / "snapshots"
    devices = [p for p in uppers.rglob("*") if p.is_char_device() and p.stat().st_rdev == 0]
    assert devices, "the multilayer image deletes files: expected 0/0 whiteout devices"


def test_index_picks_the_host_platform_and_reuses_snapshots(daemon, images):
    ch = daemon.channel()
    run_import(ch, images["busybox"].path)
    before = infos(ch)
    run_import(ch, images["multiplatform"].path)
    after = infos(ch)
    # the host's manifest in the index is busybox's layer: nothing new to extract
    assert set(after) == set(before) == set(chain_ids(images["busybox"].diff_ids))
    assert [i.created_at for i in after.values()] == [i.created_at for i in before.values()]


def test_native_snapshotter_and_docker_archive(daemon, images):
    ch = daemon.channel()
    docker = images["busybox-docker"]
    run_import(ch, docker.path, snapshotter="native")
    chain = chain_ids(docker.diff_ids)
    assert set(infos(ch, "native")) == set(chain)
    fs = daemon.root / "snapshots" / "native" / "snapshots"
    assert any((d / "fs" / "bin" / "busybox").exists() for d in fs.iterdir())


def test_wrong_diff_id_is_refused_and_leaves_nothing(daemon, tmp_path):
    """An archive whose config claims another diff ID for its layer."""
    layout = testimages.Layout()
    layer = testimages.gzip_bytes(testimages.Layer().file("hello", b"hi").tar())
    lie = testimages.sha256(b"not the layer")
    manifest, _ = layout.image([(layer, lie)], {}, testimages.host_arch())
    path = tmp_path / "lie.tar"
    layout.write(path, [testimages.named(manifest, "docker.io/test/lie:latest")])
    with pytest.raises(grpc.RpcError) as err:
        run_import(daemon.channel(), path)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "diff ID" in err.value.details()
    assert infos(daemon.channel()) == {}
    leftovers = os.listdir(daemon.root / "snapshots" / "overlayfs" / "snapshots")
    assert [e for e in leftovers if not e.startswith("rm-")] == []


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_hard_link_to_a_lower_layer_file(daemon, tmp_path, snapshotter):
    """Layer 2 hard-links a file of layer 1 (links may span layers: layers apply in order).
    Overlay applies into the upper directory, so the target is copied up there first; both
    snapshotters end with the two names on one inode with layer 1's contents."""
    layout = testimages.Layout()
    tars = [testimages.Layer().dir("bin").file("bin/tool", b"layer one", 0o755).tar(),
            testimages.Layer().dir("usr").hardlink("usr/alias", "bin/tool").tar()]
    manifest, _ = layout.image([(testimages.gzip_bytes(t), testimages.sha256(t)) for t in tars],
                               {}, testimages.host_arch())
    path = tmp_path / "links.tar"
    layout.write(path, [testimages.named(manifest, "docker.io/test/links:latest")])
    run_import(daemon.channel(), path, snapshotter=snapshotter)
    top = chain_ids([testimages.sha256(t) for t in tars])[-1]
    assert infos(daemon.channel(), snapshotter)[top].kind == pb.COMMITTED
    stub = snapshots_pb2_grpc.SnapshotsStub(daemon.channel())
    mounts = stub.View(pb.ViewSnapshotRequest(snapshotter=snapshotter, key="links-view",
                                              parent=top), metadata=MD).mounts
    with mountlib.temp_mount([Mount.from_proto(m) for m in mounts], parent=tmp_path) as root:
        root = os.fspath(root)
        alias, tool = os.lstat(f"{root}/usr/alias"), os.lstat(f"{root}/bin/tool")
        assert alias.st_ino == tool.st_ino and alias.st_nlink == 2
        assert open(f"{root}/usr/alias", "rb").read() == b"layer one"
        assert tool.st_mode & 0o777 == 0o755
    stub.Remove(pb.RemoveSnapshotRequest(snapshotter=snapshotter, key="links-view"), metadata=MD)
