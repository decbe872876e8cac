"""runtimed.images.v1.Archives over gRPC on a real runtimed: streamed import with progress,
refusals that leave nothing behind, streamed export that imports back identically."""

from __future__ import annotations

import contextlib
import io
import json
import random
import tarfile
import time

import grpc
import pytest

from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.images.v1 import archive_pb2, archive_pb2_grpc
from tests import testimages

MD = [("containerd-namespace", "default")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("images"))


def requests(data: bytes, chunk: int = 64 << 10, **options):
    yield archive_pb2.ImportRequest(options=archive_pb2.ImportOptions(**options))
    for i in range(0, len(data), chunk):
        yield archive_pb2.ImportRequest(data=data[i:i + chunk])


def run_import(channel, data: bytes, metadata=MD, **options):
    replies = list(archive_pb2_grpc.ArchivesStub(channel).Import(
        requests(data, **options), metadata=metadata, timeout=60))
    assert replies[-1].WhichOneof("response") == "result"
    return [r.progress for r in replies[:-1]], replies[-1].result


def stored(channel, metadata=MD) -> set[str]:
    stub = content_pb2_grpc.ContentStub(channel)
    return {i.digest for r in stub.List(content_pb2.ListContentRequest(), metadata=metadata)
            for i in r.info}


def image_names(channel, metadata=MD) -> list[str]:
    stub = images_pb2_grpc.ImagesStub(channel)
    return sorted(i.name for i in stub.List(images_pb2.ListImagesRequest(), metadata=metadata).images)


def test_import_streams_progress_and_creates_images(daemon, images):
    bb = images["busybox"]
    data = bb.path.read_bytes()
    with daemon.channel() as channel:
        progress, result = run_import(channel, data)
        assert [(i.name, i.target.digest) for i in result.images] == [(bb.name, bb.target["digest"])]
        assert result.images[0].target.media_type == "application/vnd.oci.image.manifest.v1+json"
        assert {p.ref for p in progress if p.action == "blob"} >= set(bb.blobs)
        assert [p.ref for p in progress if p.action == "image"] == [bb.name]
        assert max(p.offset for p in progress if p.action == "read") == len(data)
        assert image_names(channel) == [bb.name]
        assert set(bb.blobs) <= stored(channel)
    # ctr sees it like any other image
    assert bb.target["digest"] in daemon.ctr("images", "ls").stdout


def test_import_all_platforms_into_named_namespace(daemon, images):
    mp = images["multiplatform"]
    md = [("containerd-namespace", "tenant")]
    with daemon.channel() as channel:
        _, result = run_import(channel, mp.path.read_bytes(), metadata=md, all_platforms=True,
                               index_name="example.com/keep/index:1", labels={"origin": "test"})
        assert {i.name for i in result.images} == {mp.name, "example.com/keep/index:1"}
        assert set(mp.blobs) <= stored(channel, md)
        assert image_names(channel) == []  # nothing in the default namespace
        got = images_pb2_grpc.ImagesStub(channel).Get(
            images_pb2.GetImageRequest(name=mp.name), metadata=md).image
        assert got.labels["origin"] == "test"


def test_malformed_archive_invalid_argument_and_nothing_left(daemon, images):
    bb = images["busybox"]
    with tarfile.open(bb.path) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m, d in members:
            if m.name.endswith(bb.layers[0].split(":")[1]):
                d = d[:1000] + b"X" + d[1001:]  # same size, wrong digest
            tf.addfile(m, io.BytesIO(d) if d is not None else None)
    with daemon.channel() as channel:
        with pytest.raises(grpc.RpcError) as err:
            run_import(channel, buf.getvalue())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bb.layers[0].split(":")[1] in err.value.details()
        assert "does not match" in err.value.details()
        assert stored(channel) == set() and image_names(channel) == []
    assert not any((daemon.root / "content" / "blobs" / "sha256").iterdir())
    assert not any((daemon.root / "content" / "ingest").iterdir())
    assert daemon.ctr("leases", "ls", "-q").stdout.strip() == ""


def test_path_traversal_refused(daemon, images):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with daemon.channel() as channel, pytest.raises(grpc.RpcError) as err:
        run_import(channel, buf.getvalue())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "path traversal" in err.value.details()


def test_export_streams_archive_that_imports_back(daemon, images):
    names = [images[k].name for k in ("busybox", "multilayer", "multiplatform")]
    with daemon.channel() as channel:
        for k in ("busybox", "multilayer", "multiplatform"):
            run_import(channel, images[k].path.read_bytes(), all_platforms=True)
        stub = archive_pb2_grpc.ArchivesStub(channel)
        chunks = [r.data for r in stub.Export(
            archive_pb2.ExportRequest(names=names, all_platforms=True), metadata=MD, timeout=60)]
        assert max(len(c) for c in chunks) <= 1 << 20
        out = b"".join(chunks)
        md = [("containerd-namespace", "copy")]
        _, result = run_import(channel, out, metadata=md, all_platforms=True)
        assert {(i.name, i.target.digest) for i in result.images} == {
            (images[k].name, images[k].target["digest"]) for k in ("busybox", "multilayer", "multiplatform")}
        want = set().union(*(images[k].blobs for k in ("busybox", "multilayer", "multiplatform")))
        assert want <= stored(channel, md)

        docker = b"".join(r.data for r in stub.Export(
            archive_pb2.ExportRequest(names=[names[0]], format=archive_pb2.ExportRequest.DOCKER),
            metadata=MD))
        with tarfile.open(fileobj=io.BytesIO(docker)) as tf:
            manifest = json.loads(tf.extractfile("manifest.json").read())
        assert manifest[0]["RepoTags"] == ["busybox:latest"]

        with pytest.raises(grpc.RpcError) as err:
            list(stub.Export(archive_pb2.ExportRequest(names=["docker.io/library/nope:1"]), metadata=MD))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_import_with_unpack(daemon, images):
    ml = images["multilayer"]
    with daemon.channel() as channel:
        progress, result = run_import(channel, ml.path.read_bytes(), unpack=True)
    assert [p.ref for p in progress if p.action == "unpack"] == [ml.name]
    snapshots = daemon.ctr("snapshots", "ls").stdout
    assert ml.diff_ids[0] in snapshots  # the first chain ID is the first diff ID
    assert len([line for line in snapshots.splitlines()[1:] if "Committed" in line]) == 3
    config = daemon.ctr("content", "ls").stdout
    assert "containerd.io/gc.ref.snapshot.overlayfs" in config
    daemon.ctr("images", "rm", "--sync", ml.name)


def test_cancelled_import_leaves_nothing(daemon, images):
    data = images["multilayer"].path.read_bytes()
    with daemon.channel() as channel:
        stub = archive_pb2_grpc.ArchivesStub(channel)

        def half():
            yield archive_pb2.ImportRequest(options=archive_pb2.ImportOptions())
            yield archive_pb2.ImportRequest(data=data[: len(data) // 2])
            time.sleep(0.5)

        call = stub.Import(half(), metadata=MD)
        next(call)  # progress has started
        call.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if daemon.ctr("leases", "ls", "-q").stdout.strip() == "" and not stored(channel):
                break
            time.sleep(0.1)
        assert daemon.ctr("leases", "ls", "-q").stdout.strip() == ""
        assert stored(channel) == set() and image_names(channel) == []
        assert not any((daemon.root / "content" / "ingest").iterdir())


HELD = "example.com/export/held:1"


def held_image(tmp_path) -> tuple[bytes, dict, list[str]]:
    """An image of three 4 MiB incompressible layers (so an export of it is far larger
    than what HTTP/2 flow control lets the daemon send ahead of a paused reader): the
    archive, its manifest descriptor and every blob digest."""
    layout = testimages.Layout()
    rng = random.Random("export-lease")
    layers = [(testimages.gzip_bytes(rng.randbytes(4 << 20), level=1), testimages.sha256(bytes([n])))
              for n in range(3)]
    manifest, _ = layout.image(layers, {"Cmd": ["sh"]}, testimages.host_arch())
    path = tmp_path / "held.tar"
    layout.write(path, [testimages.named(manifest, HELD)])
    return path.read_bytes(), manifest, sorted(layout.blobs)


def small_window_channel(daemon):
    """A channel whose receive window stays at HTTP/2's 64 KiB (no BDP growth), so a
    reader that stops reading stops the daemon a few chunks into the archive."""
    return grpc.insecure_channel(f"unix://{daemon.address}", options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 16 << 20)])


def blob_files(daemon, digests) -> set[str]:
    base = daemon.root / "content" / "blobs" / "sha256"
    return {d for d in digests if (base / d.removeprefix("sha256:")).exists()}


def export_leases(daemon) -> list[str]:
    return [line for line in daemon.ctr("leases", "ls", "-q").stdout.split()
            if line.startswith("export-")]


def wait_for(check, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@contextlib.contextmanager
def paused_export_of_a_deleted_image(daemon, tmp_path):
    """HELD imported, its export read to the first chunk (then the reader pauses: the
    daemon is mid-archive), the image deleted with a synchronous collection; yields
    (channel, call, first chunk, manifest, digests)."""
    data, manifest, digests = held_image(tmp_path)
    with daemon.channel() as channel:
        run_import(channel, data)
    with small_window_channel(daemon) as channel:
        call = archive_pb2_grpc.ArchivesStub(channel).Export(
            archive_pb2.ExportRequest(names=[HELD]), metadata=MD, timeout=120)
        first = next(call).data
        assert len(export_leases(daemon)) == 1
        images_pb2_grpc.ImagesStub(channel).Delete(
            images_pb2.DeleteImageRequest(name=HELD, sync=True), metadata=MD)
        assert image_names(channel) == []
        # the export's lease kept every blob it is still to send through the collection
        assert blob_files(daemon, digests) == set(digests)
        yield channel, call, first, manifest, digests


def test_export_holds_its_blobs_while_the_image_is_deleted_and_collected(daemon, tmp_path):
    with paused_export_of_a_deleted_image(daemon, tmp_path) as (channel, call, first, manifest, digests):
        archive = first + b"".join(r.data for r in call)
        assert call.code() == grpc.StatusCode.OK

        md = [("containerd-namespace", "copy")]
        _, result = run_import(channel, archive, metadata=md)
        assert [(i.name, i.target.digest) for i in result.images] == [(HELD, manifest["digest"])]
        assert set(digests) <= stored(channel, md)

        # the stream is over: its lease is gone and the deleted image's blobs are collected
        # (the lease's removal schedules a collection)
        assert export_leases(daemon) == []
        assert wait_for(lambda: not (set(digests) & stored(channel)))


def test_cancelled_export_drops_its_lease(daemon, tmp_path):
    with paused_export_of_a_deleted_image(daemon, tmp_path) as (channel, call, _, _, digests):
        call.cancel()
        assert wait_for(lambda: export_leases(daemon) == [])
        assert wait_for(lambda: not blob_files(daemon, digests))
        assert stored(channel) == set()


def test_failed_export_leaves_no_lease(daemon, images):
    with daemon.channel() as channel:
        run_import(channel, images["busybox"].path.read_bytes())
        stub = archive_pb2_grpc.ArchivesStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Export(archive_pb2.ExportRequest(
                names=[images["busybox"].name, "docker.io/library/nope:1"]), metadata=MD))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert export_leases(daemon) == []


def test_daemon_crash_mid_export_drops_the_lease_at_restart(daemon, tmp_path):
    with paused_export_of_a_deleted_image(daemon, tmp_path) as (_, call, _, _, digests):
        daemon.kill9()
        call.cancel()
    daemon.start()
    # the stream died with the daemon: its lease (24 h expiry) is dropped at start, and
    # what it alone held is collected
    assert export_leases(daemon) == []
    assert wait_for(lambda: not blob_files(daemon, digests))


def test_export_cancelled_while_planned_leaves_no_lease(daemon, images):
    """The client cancels an Export while the daemon still resolves its images (one
    image named many times over): the stream is closed once the planning ends, and the
    export's lease goes with it (it was left until a restart or its 24 h expiry)."""
    bb = images["busybox"]
    with daemon.channel() as channel:
        run_import(channel, bb.path.read_bytes())
        # (~2-4 s of planning here; the lease is made first)
        call = archive_pb2_grpc.ArchivesStub(channel).Export(
            archive_pb2.ExportRequest(names=[bb.name] * 20000), metadata=MD, timeout=120)
        assert wait_for(lambda: len(export_leases(daemon)) == 1)  # being planned
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED
        assert wait_for(lambda: export_leases(daemon) == [])
        assert export_leases(daemon) == []
